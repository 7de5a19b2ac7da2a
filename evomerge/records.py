"""The records that flow between strategies, executors, workers and the store: Candidate and Evaluation.

One record type per thing: the store hands back the same ``Evaluation`` a worker made (with the
run's ``seq`` and the candidate's ``genome`` filled in), so nothing converts between a "row" and
an evaluation.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


class Status(StrEnum):
    """How an evaluation ended. A ``StrEnum``, so it is stored, logged and compared as its text."""

    OK = "ok"
    FAILED = "failed"
    """Its merge or fitness raised, its fitness is NaN, it timed out, or its workers kept dying."""
    CANCELLED = "cancelled"
    """Given up while it ran, because the run was stopped (a second signal, or the grace period
    after the first ran out). Strategies are told it like a failure; a resume does not run it again."""


def genome_hash(genome: np.ndarray) -> str:
    """Identical genomes share a hash, so a run can recognise a repeated candidate."""
    return hashlib.sha256(np.ascontiguousarray(genome, dtype=np.float64).tobytes()).hexdigest()


@dataclass
class Candidate:
    """A genome a population wants scored. ``id`` is unique within a run (``population:number``)."""

    id: str
    population: str
    genome: np.ndarray
    parent_ids: tuple[str, ...] = ()
    created: float = field(default_factory=time.time)
    must_beat: float | None = None
    """Racing (``fitness.racing``): the fitness this candidate must still be able to beat to be
    scored on every example; set by the controller when it submits the candidate, never stored.
    None: score it in full."""
    rival: np.ndarray | None = None
    """Racing: the per-example scores of the member whose fitness ``must_beat`` is, for the paired
    rule (:mod:`evomerge.fitness.racing`); set and kept like ``must_beat``."""


@dataclass
class Evaluation:
    """The outcome of scoring one candidate.

    ``fitness`` is higher-is-better; a failed candidate has ``fitness = -inf`` and an ``error``.
    ``per_example`` holds one score per fitness example (M2N2 needs them). ``population`` is the
    candidate's, so the controller tells the right strategy without reading meaning into ids.
    ``responses`` are the answers a black-box worker got from its service for this evaluation
    (cache key → answer): workers never write the run store, so the controller stores them.
    ``seq`` (the evaluation's place in the run) and ``genome`` are filled in by the store.
    ``fidelity`` is the fraction of the fitness examples scored: below 1.0 when racing stopped the
    candidate early (``per_example`` is then NaN where it was not scored, and ``fitness`` is its
    estimate from those, below its population's k-th best: :mod:`evomerge.fitness.racing`).
    """

    candidate_id: str
    status: Status
    fitness: float
    per_example: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    started: float = 0.0
    duration: float = 0.0
    error: str | None = None
    population: str = ""
    responses: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    genome: np.ndarray | None = None
    fidelity: float = 1.0

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    @property
    def usable(self) -> bool:
        return self.status == Status.OK and math.isfinite(self.fitness)

    @property
    def fully_scored(self) -> bool:
        """Usable and scored on every fitness example (not stopped early by racing)."""
        return self.usable and self.fidelity >= 1.0

    @classmethod
    def failure(
        cls, candidate_id: str, reason: str, worker: str = "", started: float = 0.0, duration: float = 0.0,
        population: str = "",
    ) -> "Evaluation":
        return cls(candidate_id, Status.FAILED, -math.inf, None, {}, worker, started, duration, reason, population)
