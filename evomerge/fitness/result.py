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
