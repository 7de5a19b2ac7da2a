"""The executor interface, and the inline executor that scores in the controller's own process.

An executor hands candidates to workers (``submit``) and returns finished evaluations (``wait``);
a worker answers ``worker.evaluate(candidate) -> Evaluation`` and never raises for a candidate's
own failure. One-off work that is not a candidate (the experts' block Gram matrices, the experts
scored alone) is a *job*: a plain picklable callable that one worker runs on itself through
``worker.run(job)``, so the executor needs no method per feature and a job crosses a process
boundary like any other value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable

from evomerge.config import RunConfig
from evomerge.errors import UserError
from evomerge.records import Candidate, Evaluation

Job = Callable[[Any], Any]
"""One-off work: called with a worker, on that worker (in its process), returns a picklable value."""


class WorkerError(UserError):
    """The worker pool cannot go on: workers cannot start or keep dying. The message says why."""


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
    def run_once(self, job: Job) -> Any:
        """``job`` run by any one worker; its value, or its exception (a ``UserError`` as itself)."""

    def shutdown(self) -> None:
        """Release workers (and anything the executor started)."""


class InlineExecutor(Executor):
    """One worker in this process; a candidate is scored when ``wait`` is called."""

    capacity = 1

    def __init__(self, config: RunConfig, setup: Job | None = None) -> None:
        from evomerge.models.loading import resolve_device
        from evomerge.models.memory import check_memory
        from evomerge.workers import make_worker

        if config.api is None:  # a black-box worker holds no weights
            check_memory(config, 1, resolve_device(config.models.device))
        self.worker = make_worker(config, "inline")
        if setup is not None:
            self.worker.run(setup)
        self._queue: deque[Candidate] = deque()

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def wait(self) -> list[Evaluation]:
        if not self._queue:
            return []
        return [self.worker.evaluate(self._queue.popleft())]

    def run_once(self, job: Job) -> Any:
        return self.worker.run(job)

    def shutdown(self) -> None:
        """Release the worker's models (or its API client) now, not whenever the process ends."""
        self.worker.close()

    @property
    def in_flight(self) -> int:
        return len(self._queue)
