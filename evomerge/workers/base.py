"""The worker contract: score a candidate, run a one-off job, release what it holds.

Executors (inline, Ray actors) drive any worker through this one interface. A worker decodes a
candidate's genome through its population's codec (built by the run plan), so it never asks which
population or merge method a genome belongs to. The shared :meth:`Worker.scored` wrapper is the one
place where a candidate's failure, or a NaN fitness, becomes a failed evaluation instead of an
exception — only a :class:`~evomerge.errors.PluginError` (every candidate would fail alike) stops
the run.
"""

from __future__ import annotations

import math
import time
import traceback
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from evomerge.errors import PluginError
from evomerge.fitness import score_range
from evomerge.fitness.racing import Raced, Racing
from evomerge.records import Candidate, Evaluation

if TYPE_CHECKING:
    from evomerge.config import RunConfig

T = TypeVar("T")

Scored = tuple[np.ndarray | Raced, dict[str, Any]]
"""Per-example scores (or a candidate's raced scores: see :mod:`evomerge.fitness.racing`) and the
metrics recorded beside them."""


def racing_of(config: "RunConfig") -> Racing:
    """The run's staged evaluation (``fitness.racing``); ``Racing()`` scores every candidate in full."""
    block = config.fitness.racing
    if block is None:
        return Racing()
    bounds = score_range(config.fitness.name) if block.scores == "auto" else block.scores
    return Racing(tuple(block.stages), block.z, block.seed, bounds, block.paired)


class Worker(ABC):
    """One process's worker: holds the models (or an API client) for a whole run."""

    worker_id: str

    @abstractmethod
    def evaluate(self, candidate: Candidate) -> Evaluation:
        """Materialize and score one candidate; its failures come back as a failed evaluation."""

    def run(self, job: Callable[["Worker"], T]) -> T:
        """A one-off job against this worker (the Gram matrices seed recipes need, the experts'
        own scores): a plain picklable callable the executor hands to any one worker."""
        return job(self)

    @abstractmethod
    def close(self) -> None:
        """Release the models or the client now, not whenever the process ends."""

    def _failed(self, exc: Exception) -> None:
        """Hook: a candidate failed with ``exc`` (a black-box worker counts service outages)."""

    def _succeeded(self) -> None:
        """Hook: a candidate was scored."""

    def scored(self, candidate_id: str, population: str, score: Callable[[], Scored]) -> Evaluation:
        """Run ``score`` and make its outcome an evaluation: the mean of the scores (of those scored,
        when racing stopped early) is the fitness; an exception or a non-finite fitness is a failed
        evaluation (a plugin's wrong shape stops the run)."""
        started, t0 = time.time(), time.perf_counter()
        try:
            scores, metrics = score()
        except PluginError:
            raise
        except Exception as exc:  # a candidate's failure must not end the run
            reason = f"{type(exc).__name__}: {exc}".strip()
            tb = traceback.format_exc(limit=3)
            self._failed(exc)
            ev = Evaluation.failure(candidate_id, reason, self.worker_id, started, time.perf_counter() - t0, population)
            ev.metrics["traceback"] = tb
            return ev
        self._succeeded()
        duration = time.perf_counter() - t0
        raced = scores if isinstance(scores, Raced) else Raced.full(scores)
        fitness = raced.fitness
        if not math.isfinite(fitness):
            return Evaluation.failure(
                candidate_id, "fitness is NaN or infinite", self.worker_id, started, duration, population
            )
        return Evaluation(
            candidate_id=candidate_id,
            status="ok",
            fitness=fitness,
            per_example=raced.per_example,
            metrics=metrics,
            worker=self.worker_id,
            started=started,
            duration=duration,
            population=population,
            fidelity=raced.fidelity,
        )
