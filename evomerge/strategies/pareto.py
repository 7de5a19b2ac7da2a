"""Several objectives: reading them from an evaluation, and the non-dominated (Pareto) set.

Multi-objective strategies (NSGA-II, MAP) maximise a list of objectives, each ``"fitness"`` or the
name of a metric the evaluation carries (e.g. one accuracy per task). The run reports the Pareto
front of every such population from what it recorded.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def objective_values(objectives: Sequence[str], fitness: float, metrics: Mapping[str, Any]) -> list[float] | None:
    """The objectives' values (all maximised), or None when the fitness or any objective is
    missing or not finite — such an evaluation counts as failed for the strategy."""
    if not math.isfinite(fitness):
        return None
    values = []
    for name in objectives:
        value = fitness if name == "fitness" else metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return None
        values.append(float(value))
    return values


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``values`` [n, k] that no other row dominates (maximising every
    column); of identical rows only the first is kept.

    Rows are visited best-first by the first objective (ties by the next): a row can only be
    dominated by one visited before it, so one and two objectives take a single sweep.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((-values).T[::-1])
    ranked = values[order]
    if values.shape[1] == 1:
        keep = order[:1]
    elif values.shape[1] == 2:
        best_before = np.concatenate([[-np.inf], np.maximum.accumulate(ranked[:-1, 1])])
        keep = order[ranked[:, 1] > best_before]
    else:
        kept: list[int] = []
        for i, row in zip(order, ranked):
            if not kept or not np.any(np.all(values[kept] >= row, axis=1)):
                kept.append(int(i))
        keep = np.array(kept)
    return np.sort(keep).astype(np.int64)


def pareto_front(evaluations: Iterable[Any], objectives: Sequence[str]) -> list[dict[str, Any]]:
    """The non-dominated evaluations (objects with ``candidate_id``, ``status``, ``fitness`` and
    ``metrics``, e.g. the store's rows), each as ``{"candidate_id", "objectives": {name: value}}``."""
    ids, rows = [], []
    for ev in evaluations:
        if ev.status != "ok" or ev.fitness is None:
            continue
        values = objective_values(objectives, ev.fitness, ev.metrics)
        if values is not None:
            ids.append(ev.candidate_id)
            rows.append(values)
    if not rows:
        return []
    return [
        {"candidate_id": ids[i], "objectives": dict(zip(objectives, rows[i]))}
        for i in non_dominated(np.array(rows))
    ]
