"""The controller: populations ↔ executor ↔ store, steady state, no generation barrier.

It keeps the executor's slots full by asking populations in turn (the one furthest behind its
share of the budget first), records every candidate before it is submitted and every evaluation
as it returns, tells the owning population, and checkpoints the strategies at a set interval and
at the end. Budgets: evaluations (split between populations by ``share``) and wall time. SIGINT /
SIGTERM stop the asking; work in flight finishes, a checkpoint is written, and the run ends cleanly.
"""

from __future__ import annotations

import pickle
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from evomerge.candidates import Evaluation
from evomerge.executors import Executor
from evomerge.store import RunStore
from evomerge.strategies import Strategy


@dataclass
class Population:
    name: str
    strategy: Strategy
    budget: int | None
    share: float
    submitted: int = 0
    finished: int = 0
    stop_reason: dict[str, Any] = field(default_factory=dict)

    def can_ask(self) -> bool:
        return not self.stop_reason and (self.budget is None or self.submitted < self.budget)


@dataclass
class Progress:
    """What a progress display needs after each evaluation."""

    evaluations: int
    total: int | None
    best: float | None
    elapsed: float
    time_left: float | None


class Controller:
    def __init__(
        self,
        store: RunStore,
        executor: Executor,
        populations: list[Population],
        max_time: float | None = None,
        checkpoint_every: int = 10,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.populations = {p.name: p for p in populations}
        self.max_time = max_time
        self.checkpoint_every = checkpoint_every
        self.on_progress = on_progress
        self._stop_requested: str | None = None
        self._last_seq = 0
        self._best: float | None = None
        self._evaluations = 0

    def request_stop(self, reason: str) -> None:
        self._stop_requested = reason

    def _next_population(self, skip: set[str]) -> Population | None:
        ready = [p for p in self.populations.values() if p.name not in skip and p.can_ask()]
        return min(ready, key=lambda p: p.submitted / p.share, default=None)

    def _fill(self) -> None:
        skip: set[str] = set()
        while self.executor.in_flight < self.executor.capacity:
            pop = self._next_population(skip)
            if pop is None:
                return
            cands = pop.strategy.ask(1)
            if not cands:
                reasons = pop.strategy.stop()
                if reasons and not pop.strategy.outstanding():
                    pop.stop_reason = reasons
                    self.store.log_event("population_stopped", f"{pop.name}: {reasons}")
                skip.add(pop.name)
                continue
            for cand in cands:
                self.store.add_candidate(cand)
                self.executor.submit(cand)
                pop.submitted += 1

    def _record(self, ev: Evaluation) -> None:
        pop = self.populations[ev.candidate_id.split(":", 1)[0]]
        self._last_seq = self.store.add_evaluation(ev)
        pop.strategy.tell([ev])
        pop.finished += 1
        self._evaluations += 1
        if ev.usable and (self._best is None or ev.fitness > self._best):
            self._best = ev.fitness
        if ev.status == "failed":
            self.store.log_event("candidate_failed", f"{ev.candidate_id}: {ev.error}")

    def checkpoint(self) -> None:
        for pop in self.populations.values():
            state = pickle.dumps(pop.strategy.state_dict())
            self.store.save_checkpoint(pop.name, state, self._last_seq)

    def _total_budget(self) -> int | None:
        budgets = [p.budget for p in self.populations.values()]
        return None if any(b is None for b in budgets) else sum(b for b in budgets if b is not None)

    def _progress(self, started: float) -> None:
        if self.on_progress is None:
            return
        elapsed = time.time() - started
        total = self._total_budget()
        left: list[float] = []
        if self.max_time is not None:
            left.append(max(0.0, self.max_time - elapsed))
        if total and self._evaluations:
            left.append(elapsed / self._evaluations * max(0, total - self._evaluations))
        self.on_progress(Progress(self._evaluations, total, self._best, elapsed, min(left) if left else None))

    def run(self) -> dict[str, Any]:
        started = time.time()
        since_checkpoint = 0
        stop_reason = "budget exhausted"
        self.store.log_event("run_started", f"populations: {', '.join(self.populations)}")
        with _graceful_signals(self.request_stop):
            while True:
                if self._stop_requested:
                    stop_reason = self._stop_requested
                elif self.max_time is not None and time.time() - started >= self.max_time:
                    stop_reason = "max_time reached"
                    self._stop_requested = stop_reason
                if not self._stop_requested:
                    self._fill()
                if self.executor.in_flight == 0:
                    if not self._stop_requested and all(p.stop_reason for p in self.populations.values()):
                        stop_reason = "all populations stopped"
                    break
                for ev in self.executor.wait():
                    self._record(ev)
                    since_checkpoint += 1
                    self._progress(started)
                if since_checkpoint >= self.checkpoint_every:
                    self.checkpoint()
                    since_checkpoint = 0
        self.checkpoint()
        summary = self.summary(stop_reason, time.time() - started)
        state = "interrupted" if stop_reason.startswith("signal") else "finished"
        self.store.set_state(state, summary)
        self.store.log_event("run_" + state, stop_reason)
        return summary

    def summary(self, stop_reason: str, elapsed: float) -> dict[str, Any]:
        best = self.store.best()
        return {
            "stop_reason": stop_reason,
            "elapsed_seconds": round(elapsed, 3),
            "evaluations": self._evaluations,
            "best": None
            if best is None
            else {"candidate_id": best.candidate_id, "population": best.population, "fitness": best.fitness},
            "populations": {
                p.name: {"evaluations": p.finished, "stop_reason": p.stop_reason or None}
                for p in self.populations.values()
            },
        }


@contextmanager
def _graceful_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop instead of killing it mid-write (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        request_stop(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
