"""One-off jobs an executor runs on a worker (``executor.run_once(job)`` → ``worker.run(job)``).

Plain picklable callables, so a job reaches a Ray actor like any other value and the executor
needs no method per feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockGrams:
    """The experts' per-block Gram matrices on a split grid, for M2N2's seed-recipe archive."""

    grid: str

    def __call__(self, worker: Any) -> Any:
        return worker.block_grams(self.grid)


@dataclass(frozen=True)
class ExpertBaselines:
    """Each expert alone, scored on the fitness data, for the report's comparison."""

    def __call__(self, worker: Any) -> Any:
        return worker.expert_baselines()


@dataclass(frozen=True)
class SeedResponses:
    """A black-box worker's setup: the service answers the run recorded, into its response cache."""

    answers: dict[str, Any]

    def __call__(self, worker: Any) -> None:
        worker.cache.seed(self.answers)
