"""One-off jobs an executor runs on any one worker (``executor.run_once(job)`` → ``worker.run(job)``).

A job is a small picklable callable taking the worker: the run asks for work that only a worker
holding the models can do, without the executor or the actor knowing what the work is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.records import Evaluation


@dataclass(frozen=True)
class BlockGrams:
    """``(edges, grams)``: the experts' Gram matrix on every block of a split grid, which M2N2's
    seed recipes breed from (computed once per run, on the worker's device)."""

    grid: str

    def __call__(self, worker) -> tuple[np.ndarray, np.ndarray]:
        return worker.models.materializer.block_grams(self.grid)


@dataclass(frozen=True)
class ExpertBaselines:
    """Each expert alone, scored on the fitness data: the report sets the best merge beside them."""

    def __call__(self, worker) -> list[Evaluation]:
        return worker.expert_baselines()


@dataclass(frozen=True)
class SeedResponses:
    """A black-box worker's setup job: the service answers the run recorded, into its response
    cache (``evomerge.service.response_cache``), so none is asked for twice."""

    answers: dict[str, Any]

    def __call__(self, worker) -> None:
        worker.cache.seed(self.answers)
