"""What a fitness function may return besides bare scores: the scores with what scoring cost.

A fitness that calls a service of its own (a judge model behind an API) spends requests, tokens
and money the run's budgets must count, and may meet replies it cannot read. It returns a
:class:`FitnessResult`; the worker sums the metrics over every call of one candidate (racing's
stages, ``fitness.tasks``) and records them in the evaluation, where ``usage`` joins the run's
API usage (``budget.requests`` / ``tokens`` / ``cost``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class FitnessResult:
    """One score per example, and counts that add up across calls: ``usage`` (``requests``,
    ``prompt_tokens``, ``completion_tokens``, ``cost``) and any other number or nested mapping
    of numbers (e.g. ``judge_unparsable``)."""

    scores: Any
    metrics: dict[str, Any] = field(default_factory=dict)


class FitnessFailed(Exception):
    """A fitness function's failure that carries what it spent before failing (``metrics``, as a
    :class:`FitnessResult`'s): a judge that stopped answering was still paid for its requests."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


def split_result(raw: Any) -> tuple[Any, dict[str, Any]]:
    """(the scores, the metrics) of a fitness function's return value; bare scores have none."""
    if isinstance(raw, FitnessResult):
        return raw.scores, raw.metrics
    return raw, {}


def add_metrics(total: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """``total`` with ``more`` added into it key by key (nested mappings recursively)."""
    for key, value in more.items():
        if isinstance(value, Mapping):
            add_metrics(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total



def task_of(example: Any) -> str | None:
    """The task an example belongs to: a text row's ``task`` field, an lm-eval document's task."""
    if isinstance(example, dict):
        task = example.get("task")
    else:
        task = getattr(example, "task", None)
    return None if task is None else str(task)


def task_means(examples: Any, per_example: Any) -> dict[str, float]:
    """The mean score of each task, for examples that name theirs (rows with a ``task`` field,
    lm-eval documents); racing's unscored (NaN) examples are left out. Empty when none names one.

    What the report divides per task (best merge over each expert), so that one weak benchmark
    is not hidden in the mean of several."""
    import numpy as np

    if isinstance(examples, dict):  # tensors: no rows to name a task
        return {}
    by_task: dict[str, list[float]] = {}
    for example, score in zip(examples, np.asarray(per_example, dtype=np.float64)):
        task = task_of(example)
        if task is not None and not np.isnan(score):
            by_task.setdefault(task, []).append(float(score))
    return {task: float(np.mean(values)) for task, values in by_task.items()}


def per_task_metrics(examples: Any, per_example: Any) -> dict[str, Any]:
    """``{"per_task": {task: mean}}`` for an evaluation's metrics, or nothing when no example names a task."""
    means = task_means(examples, per_example)
    return {"per_task": means} if means else {}
