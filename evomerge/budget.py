"""A run's limits and when they stop it: ``Budget(limits).stop(state) -> {reason: value}``.

As pycma's ``stop()``: the answer is a dict of the limits that are reached (empty while the run
goes on), so the run log can say why it stopped. Evaluation budgets per population are the plan's
(:meth:`evomerge.plan.RunPlan.budgets`); this owns the rules on the whole run — time, deadline,
target fitness, patience and black-box API usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evomerge.config import BudgetConfig, resolve_deadline

USAGE_KEYS = ("requests", "tokens", "cost")
"""Black-box usage limits, by the key of the run's usage totals (``tokens``: prompt + completion)."""


@dataclass(frozen=True)
class BudgetState:
    """What the stop rules look at: searching time, wall clock, and the run's results so far."""

    elapsed: float
    now: float
    evaluations: int
    best: float | None
    best_at: int
    """Evaluations counted when the best last improved."""
    usage: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    """The run-wide limits of a config's ``budget`` (None: no such limit)."""

    max_time: float | None = None
    deadline: float | None = None
    """A Unix time."""
    target_fitness: float | None = None
    patience: int | None = None
    usage: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, budget: BudgetConfig) -> "Budget":
        usage = {key: getattr(budget, key) for key in USAGE_KEYS if getattr(budget, key) is not None}
        deadline = None if budget.deadline is None else resolve_deadline(budget.deadline).timestamp()
        return cls(budget.max_time, deadline, budget.target_fitness, budget.patience, usage)

    def stop(self, state: BudgetState) -> dict[str, Any]:
        """The limits ``state`` has reached, each with its configured value (empty: go on)."""
        reasons: dict[str, Any] = {}
        if self.max_time is not None and state.elapsed >= self.max_time:
            reasons["max_time"] = self.max_time
        if self.deadline is not None and state.now >= self.deadline:
            reasons["deadline"] = self.deadline
        if self.target_fitness is not None and state.best is not None and state.best >= self.target_fitness:
            reasons["target_fitness"] = self.target_fitness
        for key, limit in self.usage.items():
            if state.usage.get(key, 0.0) >= limit:
                reasons[key] = limit
        if self.patience is not None and state.evaluations - state.best_at >= self.patience:
            reasons["patience"] = self.patience
        return reasons

    def describe(self, reasons: dict[str, Any], state: BudgetState) -> str:
        """The first reason in words, as the run's summary and log record it."""
        key, value = next(iter(reasons.items()))
        if key == "max_time":
            return "max_time reached"
        if key == "deadline":
            return "deadline reached"
        if key == "target_fitness":
            return f"target fitness {value} reached"
        if key == "patience":
            return f"no improvement for {value} evaluations"
        return f"{key} budget reached ({state.usage.get(key, 0.0):g} of {value:g})"


def pin_deadline(budget: BudgetConfig) -> None:
    """Write a clock-time deadline (``"07:00"``) as the date-time it means now, so the run's
    snapshot and a later resume keep tonight's 07:00 rather than the next one."""
    if budget.deadline is not None:
        budget.deadline = resolve_deadline(budget.deadline).isoformat(timespec="seconds")


AUTO_FAILURES_AT_START = 8
"""The least ``budget.max_failures_at_start: auto`` allows (it is at least two rounds of workers)."""


def failures_at_start_limit(budget: BudgetConfig, workers: int) -> int | None:
    """How many failures in a row, all alike and before any success, stop the run (None: never)."""
    value = budget.max_failures_at_start
    if value == "auto":
        return max(AUTO_FAILURES_AT_START, 2 * workers)
    return value or None


@dataclass
class FailureStreak:
    """Stops a run that cannot succeed: its first candidates all fail with the same error.

    A broken fitness plugin or a model that always gives NaN would otherwise spend the whole
    budget failing. Only failures before the session's first success count, so a run that has
    worked goes on through failures (they are recorded), and a resume tries afresh (the user
    may have fixed the plugin). "The same way" is the same first line of the error.
    """

    limit: int | None
    count: int = 0
    error: str | None = None
    succeeded: bool = False

    def observe(self, ok: bool, error: str | None) -> str | None:
        """Count one finished evaluation; the reason to stop the run, once the limit is reached."""
        if self.succeeded or self.limit is None:
            return None
        if ok:
            self.succeeded = True
            return None
        first = (error or "").strip().splitlines()[0] if (error or "").strip() else "unknown error"
        self.count = self.count + 1 if first == self.error else 1
        self.error = first
        if self.count < self.limit:
            return None
        return (
            f"the first {self.count} candidates all failed with: {first}"
            " (budget.max_failures_at_start); fix the cause and resume"
        )
