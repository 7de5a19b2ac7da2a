"""Executors run candidates on workers: ``submit`` a candidate, ``wait`` for finished evaluations.

The inline executor scores in the controller's own process — the mode for tests, debugging and
small CPU runs. The Ray actor pool (default for cluster runs) implements the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import numpy as np

from evomerge.candidates import Candidate, Evaluation
from evomerge.config import RunConfig


class Executor(ABC):
    capacity: int
    """How many candidates may be in flight at once."""

    @abstractmethod
    def submit(self, candidate: Candidate) -> None: ...

    @abstractmethod
    def wait(self) -> list[Evaluation]:
        """Block until at least one submitted candidate has finished; return the finished ones."""

    @property
    @abstractmethod
    def in_flight(self) -> int: ...

    @abstractmethod
    def block_grams(self, grid: str) -> tuple[np.ndarray, np.ndarray]:
        """The experts' per-block Gram matrices (M2N2 seed recipes), from any one worker."""

    def shutdown(self) -> None:
        """Release workers (no-op for the inline executor)."""


class InlineExecutor(Executor):
    """One worker in this process; a candidate is scored when ``wait`` is called."""

    capacity = 1

    def __init__(self, config: RunConfig) -> None:
        from evomerge.workers.local import LocalWorker

        self.worker = LocalWorker(config, worker_id="inline")
        self._queue: deque[Candidate] = deque()

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def wait(self) -> list[Evaluation]:
        if not self._queue:
            return []
        cand = self._queue.popleft()
        return [self.worker.evaluate(cand.id, cand.genome, cand.population)]

    def block_grams(self, grid: str) -> tuple[np.ndarray, np.ndarray]:
        return self.worker.block_grams(grid)

    @property
    def in_flight(self) -> int:
        return len(self._queue)
