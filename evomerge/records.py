"""The records that flow between strategies, executors, workers and the store: Candidate and Evaluation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATUSES = ("ok", "failed", "cancelled")


@dataclass
class Candidate:
    """A genome a population wants scored. ``id`` is unique within a run (``population:number``)."""

    id: str
    population: str
    genome: np.ndarray
    parent_ids: tuple[str, ...] = ()
    created: float = field(default_factory=time.time)


@dataclass
class Evaluation:
    """The outcome of scoring one candidate.

    ``fitness`` is higher-is-better; a failed candidate has ``fitness = -inf`` and an ``error``.
    ``per_example`` holds one score per fitness example (M2N2 needs them).
    """

    candidate_id: str
    status: str
    fitness: float
    per_example: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    started: float = 0.0
    duration: float = 0.0
    error: str | None = None
    population: str = ""

    @property
    def usable(self) -> bool:
        return self.status == "ok" and math.isfinite(self.fitness)

    @classmethod
    def failure(cls, candidate_id: str, reason: str, worker: str = "", started: float = 0.0, duration: float = 0.0) -> "Evaluation":
        return cls(candidate_id, "failed", -math.inf, None, {}, worker, started, duration, reason)
