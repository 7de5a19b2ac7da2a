"""The executor interface, and the inline executor that scores in the controller's own process.

An executor hands candidates to workers (``submit``) and returns finished evaluations (``wait``);
a worker answers ``worker.evaluate(candidate) -> Evaluation`` and never raises for a candidate's
own failure. One-off work that is not a candidate (the experts' block Gram matrices, the experts
scored alone) is a *job*: a plain picklable callable that one worker runs on itself through
``worker.run(job)``, so the executor needs no method per feature and a job crosses a process
boundary like any other value.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from evomerge.config import RunConfig
from evomerge.errors import UserError
from evomerge.executors.timeouts import CandidateTimeout
from evomerge.records import Candidate, Evaluation, Status

log = logging.getLogger(__name__)

Job = Callable[[Any], Any]
"""One-off work: called with a worker, on that worker (in its process), returns a picklable value."""


class WorkerError(UserError):
    """The worker pool cannot go on: workers cannot start or keep dying. The message says why."""


class Executor(ABC):
    capacity: int
    """How many candidates may be in flight at once."""
    halted: str | None = None
    """Why this executor cannot score any more candidates (the run must stop), or None."""

    @abstractmethod
    def submit(self, candidate: Candidate) -> None: ...

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[Evaluation]:
        """Block until at least one submitted candidate has finished, or ``timeout`` seconds have
        passed (then the list may be empty); return the finished ones. A candidate running past
        its time limit (``workers.timeout``) comes back failed ("timed out after Ns")."""

    @abstractmethod
    def cancel(self, reason: str) -> list[Evaluation]:
        """Give up every running candidate now: each comes back ``cancelled`` with ``reason``.
        Candidates not yet started are dropped unrecorded (a resume submits them again)."""

    @property
    @abstractmethod
    def in_flight(self) -> int: ...

    @abstractmethod
    def run_once(self, job: Job) -> Any:
        """``job`` run by any one worker; its value, or its exception (a ``UserError`` as itself)."""

    def shutdown(self) -> None:
        """Release workers (and anything the executor started)."""


def cancelled(candidate: Candidate, reason: str, worker: str, started: float) -> Evaluation:
    """A candidate given up while it ran: recorded, so a resume never starts with it again."""
    duration = time.time() - started
    return Evaluation(
        candidate.id, Status.CANCELLED, -math.inf, None, {}, worker, started, duration, reason, candidate.population
    )


@dataclass
class _Running:
    """The inline worker's current candidate, scored on a thread of its own."""

    candidate: Candidate
    started: float
    deadline: float | None
    """``time.monotonic()`` by which it must finish; None: no limit."""
    limit: float | None
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Evaluation | BaseException | None = None


class InlineExecutor(Executor):
    """One worker in this process; a candidate is scored when ``wait`` is called.

    The worker scores on a daemon thread while the caller waits for it, so the caller keeps
    control: signals are handled, and a candidate past its time limit is given up. Python cannot
    stop a running call, so a timed-out (or cancelled) candidate leaves that thread running on the
    worker's model, whose state is then unknown: the executor is ``halted`` and the run stops
    (resumable) instead of scoring more candidates on it. The Ray executor replaces the worker.
    """

    capacity = 1

    def __init__(
        self, config: RunConfig, setup: Job | None = None, on_phase: Callable[[str], None] = lambda text: None
    ) -> None:
        from evomerge.models.loading import resolve_devices
        from evomerge.models.memory import check_memory, summary, with_residency
        from evomerge.workers import make_worker

        if config.api is None:  # a black-box worker holds no weights
            device = resolve_devices(config.models.device, config.models.devices)[0]  # the first, if it spans several
            need = check_memory(config, 1, device)
            log.info("loading models: %s", summary(need, device))
            on_phase(f"loading models ({summary(need, device)})")
            config = with_residency(config, need.tier)
        else:
            on_phase("loading models")
        self.worker = make_worker(config, "inline")
        if setup is not None:
            self.worker.run(setup)
        self._queue: deque[Candidate] = deque()
        self._running: _Running | None = None
        self.timeout = CandidateTimeout(config.workers.timeout)

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def _start(self) -> _Running:
        candidate = self._queue.popleft()
        limit = self.timeout.seconds()
        deadline = None if limit is None else time.monotonic() + limit
        running = _Running(candidate, time.time(), deadline, limit)

        def score() -> None:
            try:
                running.outcome = self.worker.evaluate(candidate)
            except BaseException as exc:  # a PluginError stops the run: the caller re-raises it
                running.outcome = exc
            running.done.set()

        threading.Thread(target=score, name=f"evaluate {candidate.id}", daemon=True).start()
        return running

    def wait(self, timeout: float | None = None) -> list[Evaluation]:
        if self.halted is not None:
            return []
        if self._running is None:
            if not self._queue:
                return []
            self._running = self._start()
        running = self._running
        to_deadline = None if running.deadline is None else running.deadline - time.monotonic()
        limits = [t for t in (timeout, to_deadline) if t is not None]
        if not running.done.wait(max(0.0, min(limits)) if limits else None):
            if running.deadline is None or time.monotonic() < running.deadline:
                return []
            reason = CandidateTimeout.reason(running.limit)
            self._halt(f"candidate {running.candidate.id} {reason}")
            duration = time.time() - running.started
            cand = running.candidate
            worker = self.worker.worker_id
            return [Evaluation.failure(cand.id, reason, worker, running.started, duration, cand.population)]
        self._running = None
        if isinstance(running.outcome, BaseException):
            raise running.outcome
        self.timeout.observe(running.outcome.duration)
        return [running.outcome]

    def cancel(self, reason: str) -> list[Evaluation]:
        running, self._running = self._running, None
        self._queue.clear()
        if running is None:
            return []
        if running.done.is_set() and isinstance(running.outcome, Evaluation):
            return [running.outcome]  # it finished meanwhile: its result stands
        self._halt(f"candidate {running.candidate.id} was cancelled")
        return [cancelled(running.candidate, reason, self.worker.worker_id, running.started)]

    def _halt(self, what: str) -> None:
        """The worker thread is still busy with a candidate given up: score nothing more here."""
        self._running = None
        self._queue.clear()
        self.halted = (
            f"{what} and is still running: the inline executor cannot stop a running call, so the run"
            " stops (resume to go on without it, or use executor: ray, which replaces a stuck worker)"
        )

    def run_once(self, job: Job) -> Any:
        return self.worker.run(job)

    def shutdown(self) -> None:
        """Release the worker's models (or its API client) now, not whenever the process ends;
        after a candidate was given up, its thread still uses them, so they go with the process."""
        if self.halted is None:
            self.worker.close()

    @property
    def in_flight(self) -> int:
        return len(self._queue) + (self._running is not None)
