"""Fitness functions: ``fn(model, tokenizer, examples) -> per-example scores`` (higher is better).

Built-ins are named by registry key; user plugins by ``"package.module:function"`` or by name
through the entry-point group ``evomerge.fitness``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

import numpy as np

from evomerge.errors import PluginError
from evomerge.fitness.classification import classification_accuracy

FitnessFn = Callable[[Any, Any, Any], Any]

FITNESS_FUNCTIONS: dict[str, FitnessFn] = {
    "classification_accuracy": classification_accuracy,
}

ENTRY_POINT_GROUP = "evomerge.fitness"


def resolve_fitness(name: str) -> FitnessFn:
    """A built-in, a ``module:function`` reference, or an entry point of ``evomerge.fitness``."""
    if name in FITNESS_FUNCTIONS:
        return FITNESS_FUNCTIONS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import-time failure of user code is the user's to fix
            raise PluginError(f"fitness plugin '{name}': cannot import {module_name}: {exc}") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise PluginError(f"fitness plugin '{name}': {module_name} has no function '{attr}'")
        return fn
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:
                raise PluginError(f"fitness entry point '{name}' failed to load: {exc}") from None
    known = ", ".join(sorted(FITNESS_FUNCTIONS))
    raise PluginError(
        f"unknown fitness '{name}': use a built-in ({known}), 'package.module:function',"
        f" or an entry point in the group '{ENTRY_POINT_GROUP}'"
    )


def per_example_scores(raw: Any, n_examples: int, name: str) -> np.ndarray:
    """Validate a fitness function's return value: one finite-or-NaN float per example."""
    try:
        scores = np.asarray(raw.detach().cpu() if hasattr(raw, "detach") else raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise PluginError(f"fitness '{name}' returned {type(raw).__name__}, expected one score per example") from None
    if scores.shape != (n_examples,):
        raise PluginError(
            f"fitness '{name}' returned scores of shape {scores.shape}, expected ({n_examples},): one per example"
        )
    return scores


__all__ = ["FITNESS_FUNCTIONS", "FitnessFn", "per_example_scores", "resolve_fitness"]
