"""The controller: populations ↔ executor ↔ store, steady state, no generation barrier.

It keeps the executor's slots full by asking populations in turn (the one furthest behind its
share of the budget first), records every candidate before it is submitted and every evaluation
as it returns, tells the owning population, and checkpoints the strategies at a set interval and
at the end. With racing (``fitness.racing``), each candidate goes out with the fitness it must be
able to beat to be scored in full: its population's k-th best fully scored fitness so far. Budgets:
evaluations (split between populations by ``share``) and wall time. SIGINT /
SIGTERM stop the asking; work in flight may finish for a grace period (a second signal ends it at
once), then what still runs is cancelled, a checkpoint is written, and the run ends resumable. A
run whose first candidates all fail the same way stops early as ``failed`` (``FailureStreak``).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from evomerge import plaindata
from evomerge.budget import Budget, BudgetState, FailureStreak
from evomerge.errors import RunDirError
from evomerge.executors import Executor
from evomerge.records import Candidate, Evaluation, Status, genome_hash
from evomerge.store import RunStore
from evomerge.strategies import Strategy
from evomerge.strategies.pareto import pareto_front

log = logging.getLogger(__name__)

WAIT_TICK = 0.25
"""Longest wait for the executor at a time: the loop looks at signals, limits and the progress
display this often even while every worker is busy with a long candidate."""


@dataclass
class Population:
    name: str
    strategy: Strategy
    budget: int | None
    share: float
    cache_scope: str = "space"
    """Populations whose genomes mean the same merge share cached evaluations."""
    submitted: int = 0
    finished: int = 0
    stop_reason: dict[str, Any] = field(default_factory=dict)
    best: float | None = None
    racing_rank: int | None = None
    """Racing: the rank of the fully scored member a candidate must be able to beat to matter to
    this population's strategy (:meth:`Strategy.racing_rank`); None: racing is off."""
    leaders: list[Evaluation] = field(default_factory=list)
    """The best fully scored evaluations, best first (as many as ``racing_rank``)."""

    def can_ask(self) -> bool:
        return not self.stop_reason and (self.budget is None or self.submitted < self.budget)

    def rival(self) -> Evaluation | None:
        """What a new candidate must be able to beat to be scored in full: the ``racing_rank``-th
        best fully scored member; None (score in full) without racing or before that many are known."""
        k = self.racing_rank
        return self.leaders[k - 1] if k is not None and len(self.leaders) >= k else None

    def admit(self, ev: Evaluation) -> None:
        if self.racing_rank is not None:  # sorted is stable: of equal fitnesses the earlier stays ahead
            self.leaders = sorted([*self.leaders, ev], key=lambda e: e.fitness, reverse=True)[: self.racing_rank]


@dataclass
class Progress:
    """What a progress display needs after each evaluation."""

    evaluations: int
    total: int | None
    best: float | None
    elapsed: float
    time_left: float | None
    population_best: dict[str, float | None] = field(default_factory=dict)
    busy: int = 0
    workers: int = 0


class Controller:
    def __init__(
        self,
        store: RunStore,
        executor: Executor,
        populations: list[Population],
        budget: Budget = Budget(),
        checkpoint_every: int = 10,
        on_progress: Callable[[Progress], None] | None = None,
        migration: tuple[int, int] | None = None,
        grace_period: float = 120.0,
        max_failures_at_start: int | None = None,
        racing_top_k: int | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.populations = {p.name: p for p in populations}
        self.budget = budget
        self.checkpoint_every = checkpoint_every
        self.on_progress = on_progress
        self.migration = migration  # (every, size)
        if racing_top_k is not None:  # None: racing is off
            for pop in populations:
                pop.racing_rank = pop.strategy.racing_rank(racing_top_k)
        self._usage = {"requests": 0.0, "tokens": 0.0, "cost": 0.0, "examples": 0.0}
        self._best_at = 0  # evaluations counted when the best last improved
        self._stop_requested: str | None = None
        self.grace_period = grace_period
        self._stop_since: float | None = None  # time.monotonic() of the first stop signal
        self._cancel_now = False  # a second signal: cancel what runs without waiting out the grace
        self._failed = False  # the run stopped because it cannot succeed (state "failed")
        self._streak = FailureStreak(max_failures_at_start)
        self._last_seq = 0
        self._best: float | None = None
        self._evaluations = 0
        self._active_before = 0.0  # searching time of earlier sessions of a resumed run

    def _event(self, kind: str, message: str) -> None:
        """An event for the store (status, reports) and the run's structured log."""
        self.store.log_event(kind, message)
        log.info(message, extra={"event": kind})

    def request_stop(self, reason: str, failed: bool = False) -> None:
        """Stop asking for candidates; ``failed``: the run cannot succeed (it ends ``failed``)."""
        if self._stop_requested is None:
            self._stop_requested, self._failed = reason, failed

    def signalled(self, name: str) -> None:
        """A SIGINT/SIGTERM: the first stops the asking and starts the grace period in which running
        candidates may finish; a second cancels them now."""
        if self._stop_since is None:
            self._stop_since = time.monotonic()
            self.request_stop(f"signal {name}")
        else:
            self._cancel_now = True

    def _cancel_due(self) -> str | None:
        """Why the candidates still running should be cancelled now, or None."""
        if self._stop_since is None:
            return None
        if self._cancel_now:
            return "a second signal"
        if time.monotonic() - self._stop_since >= self.grace_period:
            return f"the {self.grace_period:g}s grace period (workers.grace_period)"
        return None

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
                    self._event("population_stopped", f"{pop.name}: {reasons}")
                skip.add(pop.name)
                continue
            for cand in cands:
                self.store.add_candidate(cand, asked_after=self._last_seq)
                pop.submitted += 1
                cached = self._cached(pop, cand)
                if cached is None:
                    self._submit(pop, cand)
                else:
                    self._record(cached)

    def _submit(self, pop: Population, cand: Candidate) -> None:
        rival = pop.rival()
        if rival is not None:
            cand = dataclasses.replace(cand, must_beat=rival.fitness, rival=rival.per_example)
        self.executor.submit(cand)

    def _cached(self, pop: Population, cand: Candidate) -> Evaluation | None:
        """A copy of an earlier result for the same genome: identical genomes are scored once."""
        scope = [p.name for p in self.populations.values() if p.cache_scope == pop.cache_scope]
        earlier = self.store.scored_genome(genome_hash(cand.genome), scope)
        if earlier is None:
            return None
        metrics = {**earlier.metrics, "cached_from": earlier.candidate_id}
        if "usage" in metrics:  # a repeated candidate asks the service nothing
            metrics["usage"] = {key: 0 for key in metrics["usage"]}
        if "examples_scored" in metrics:  # nor does it score an example
            metrics["examples_scored"] = 0
        return dataclasses.replace(
            earlier, candidate_id=cand.id, population=cand.population, metrics=metrics, worker="cache",
            started=time.time(), duration=0.0, seq=0, genome=None,
        )

    def _record(self, ev: Evaluation) -> None:
        if ev.per_example is not None:  # strategies see exactly what the store keeps (float32)
            ev.per_example = np.asarray(ev.per_example, dtype=np.float32).astype(np.float64)
        self._last_seq = self.store.add_evaluation(ev)
        self._tell(ev)
        self._migrate()
        if ev.status == Status.FAILED:
            self._event("candidate_failed", f"{ev.candidate_id}: {ev.error}")
        if ev.status == Status.CANCELLED:
            self._event("candidate_cancelled", f"{ev.candidate_id}: {ev.error}")
            return
        cannot_succeed = self._streak.observe(ev.usable, ev.error)
        if cannot_succeed:
            self.request_stop(cannot_succeed, failed=True)

    def _tell(self, ev: Evaluation) -> None:
        pop = self.populations[ev.population]
        pop.strategy.tell([ev])
        pop.finished += 1
        if ev.fully_scored and (pop.best is None or ev.fitness > pop.best):
            pop.best = ev.fitness
        if ev.fully_scored:
            pop.admit(ev)
        self._evaluations += 1
        self._usage["examples"] += ev.metrics.get("examples_scored", 0)
        usage = ev.metrics.get("usage")
        if usage:
            self._usage["requests"] += usage.get("requests", 0)
            self._usage["tokens"] += usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
            self._usage["cost"] += usage.get("cost", 0.0)
        if ev.fully_scored and (self._best is None or ev.fitness > self._best):
            self._best = ev.fitness
            self._best_at = self._evaluations

    def _migrate(self) -> None:
        """At every ``every``-th evaluation, each population takes in the others' best members.

        Only what was recorded up to this evaluation is used, so a resumed run's replay migrates
        exactly as the run did.
        """
        if self.migration is None or self._last_seq % self.migration[0]:
            return
        _, size = self.migration
        for pop in self.populations.values():
            for other in self.populations.values():
                if other is pop or other.cache_scope != pop.cache_scope:
                    continue
                for row in self.store.top(other.name, size, self._last_seq):
                    pop.strategy.immigrate(row.genome, row)
        log.debug("migration after %d evaluations", self._last_seq)

    def checkpoint(self, active_seconds: float) -> None:
        states = {p.name: plaindata.dumps(p.strategy.state_dict()) for p in self.populations.values()}
        self.store.save_checkpoints(states, self._last_seq, active_seconds)

    def restore(self) -> None:
        """Bring the populations back to where the run stopped, however it stopped.

        Strategies load their last checkpoint, then everything recorded after it is replayed in
        the order it happened: each recorded ask is asked again (and must give the same candidate:
        strategies are deterministic given their seed and what they were told) and each recorded
        evaluation is told again. Nothing recorded is scored twice; candidates asked but never
        scored are outstanding again and :meth:`run` submits them first.
        """
        states, seq = self.store.checkpoints()
        try:
            decoded = {name: plaindata.loads(blob) for name, blob in states.items()}
        except ValueError:
            # A checkpoint from before states were plain data (a pickle, never loaded): replaying
            # the whole recorded log from fresh strategies gives the same populations.
            decoded, seq = {}, 0
            log.info("%s: checkpoint in an old format; replaying the run from its start", self.store.run_dir)
        for name, state in decoded.items():
            self.populations[name].strategy.load_state_dict(state)
        self._last_seq = seq
        self._active_before = self.store.run_info()["active_seconds"]
        for kind, item in self.store.replay_log(seq):
            if kind == "ask":
                population, candidate_id, recorded_hash = item
                asked = self.populations[population].strategy.ask(1)
                if not asked or asked[0].id != candidate_id or genome_hash(asked[0].genome) != recorded_hash:
                    got = asked[0].id if asked else "nothing"
                    raise RunDirError(
                        f"{self.store.run_dir}: cannot resume: population '{population}' asked {got} where the"
                        f" run recorded {candidate_id}: its strategy is not deterministic, or {self.store.db_path.name}"
                        " was edited or damaged; restore it from a backup, or start a new run"
                    )
            else:
                self._last_seq = item.seq
                self._tell(item)
                self._migrate()
        for name, (asked_count, _) in self.store.evaluation_counts().items():
            self.populations[name].submitted = asked_count
        for pop in self.populations.values():
            pop.finished = pop.submitted - len(pop.strategy.outstanding())
        self._evaluations = sum(p.finished for p in self.populations.values())
        best = self.store.best()
        self._best = None if best is None else best.fitness
        self._best_at = 0 if best is None else best.seq
        self._usage = self.store.api_usage()  # every session's, not only the replayed part
        for pop in self.populations.values():
            row = self.store.best(pop.name)
            pop.best = None if row is None else row.fitness
            if pop.racing_rank is not None:  # the leaders before the checkpoint were not replayed
                pop.leaders = self.store.top(pop.name, pop.racing_rank, self._last_seq)

    def _total_budget(self) -> int | None:
        budgets = [p.budget for p in self.populations.values()]
        return None if any(b is None for b in budgets) else sum(b for b in budgets if b is not None)

    def _progress(self, started: float) -> None:
        if self.on_progress is None:
            return
        elapsed = time.time() - started
        total = self._total_budget()
        left: list[float] = []
        if self.budget.max_time is not None:
            left.append(max(0.0, self.budget.max_time - elapsed))
        if total and self._evaluations:
            left.append(elapsed / self._evaluations * max(0, total - self._evaluations))
        self.on_progress(
            Progress(
                self._evaluations,
                total,
                self._best,
                elapsed,
                min(left) if left else None,
                {p.name: p.best for p in self.populations.values()},
                self.executor.in_flight,
                self.executor.capacity,
            )
        )

    def run(self) -> dict[str, Any]:
        started = time.time() - self._active_before
        since_checkpoint = 0
        stop_reason = "budget exhausted"
        self._event("run_started", f"populations: {', '.join(self.populations)}")
        for pop in self.populations.values():  # after a restore: what was in flight when the run stopped
            for cand in sorted(pop.strategy.outstanding(), key=lambda c: int(c.id.rsplit(":", 1)[1])):
                self._submit(pop, cand)
        with _graceful_signals(self.signalled):
            while True:
                if self.executor.halted is not None:
                    self.request_stop(self.executor.halted, failed=True)
                if not self._stop_requested:
                    limit = self._limit_reached(started)
                    if limit:
                        self.request_stop(limit)
                if self._stop_requested:
                    stop_reason = self._stop_requested
                else:
                    self._fill()
                if self.executor.in_flight == 0:
                    if not self._stop_requested and all(p.stop_reason for p in self.populations.values()):
                        stop_reason = "all populations stopped"
                    break
                why = self._cancel_due()
                if why is not None:
                    stop_reason += self._cancel(why)
                    break
                for ev in self.executor.wait(WAIT_TICK):
                    self._record(ev)
                    since_checkpoint += 1
                self._progress(started)
                if since_checkpoint >= self.checkpoint_every:
                    self.checkpoint(time.time() - started)
                    since_checkpoint = 0
        searching = time.time() - started
        self.checkpoint(searching)
        resumable = stop_reason.startswith("signal") or stop_reason == "deadline reached"
        state = "failed" if self._failed else "interrupted" if resumable else "finished"
        summary = self.summary(stop_reason, searching, state)
        self.store.set_state(state, summary)
        self._event("run_" + state, stop_reason)
        return summary

    def _cancel(self, why: str) -> str:
        """Cancel the candidates still running and record them, so a resume does not start with
        them again (a hung one would hang again); what to add to the stop reason."""
        evaluations = self.executor.cancel(f"cancelled: the run was stopped ({why})")
        for ev in evaluations:
            self._record(ev)
        count = sum(ev.status == Status.CANCELLED for ev in evaluations)
        return f"; {count} running evaluation(s) cancelled after {why}" if count else ""

    def _limit_reached(self, started: float) -> str | None:
        """Why the run should stop asking now (besides budgets and signals), or None."""
        now = time.time()
        state = BudgetState(now - started, now, self._evaluations, self._best, self._best_at, self._usage)
        reasons = self.budget.stop(state)
        return self.budget.describe(reasons, state) if reasons else None

    def summary(self, stop_reason: str, searching: float, state: str) -> dict[str, Any]:
        """What the run ends with. ``search_seconds``: time in the search loop, all sessions (what
        ``max_time`` counts); ``wall_seconds``: since the run was created (starting workers,
        scoring the experts and pauses between sessions included)."""
        best = self.store.best()
        return {
            "state": state,
            "stop_reason": stop_reason,
            "search_seconds": round(searching, 3),
            "wall_seconds": round(time.time() - self.store.run_info()["created"], 3),
            "evaluations": self._evaluations,
            "examples_scored": int(self._usage["examples"]),
            "best": None
            if best is None
            else {"candidate_id": best.candidate_id, "population": best.population, "fitness": best.fitness},
            "populations": {
                p.name: {
                    "evaluations": p.finished,
                    "stop_reason": p.stop_reason or None,
                    **population_front(self.store, p.name, getattr(p.strategy.options, "objectives", None)),
                }
                for p in self.populations.values()
            },
        }


def population_front(store: RunStore, population: str, objectives: list[str] | None) -> dict[str, Any]:
    """``{"objectives", "pareto_front"}`` of a population searching several objectives (NSGA-II,
    MAP), from what the store recorded; empty for single-objective populations."""
    if not objectives or len(objectives) < 2:
        return {}
    return {"objectives": list(objectives), "pareto_front": pareto_front(store.evaluations(population), objectives)}


@contextmanager
def _graceful_signals(signalled: Callable[[str], None]) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop instead of killing it mid-write (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        signalled(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
