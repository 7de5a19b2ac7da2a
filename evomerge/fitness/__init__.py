"""Fitness functions: ``fn(model, tokenizer, examples) -> per-example scores`` (higher is better),
or a :class:`~evomerge.fitness.result.FitnessResult` when scoring costs API usage (a judge).

Built-ins are named by registry key; user plugins by ``"package.module:function"`` or by name
through the entry-point group ``evomerge.fitness``. Most read their examples from ``fitness.data``;
``lm_eval`` brings its own (the documents of its lm-eval tasks, :func:`own_examples`).
"""

from __future__ import annotations

import functools
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

import numpy as np

from evomerge.errors import PluginError
from evomerge.fitness.classification import classification_accuracy
from evomerge.fitness.harness import lm_eval_documents, lm_eval_fitness
from evomerge.fitness.judge import check_options as check_judge_options, judge
from evomerge.fitness.lm import exact_match, multiple_choice_loglik, negative_cross_entropy
from evomerge.fitness.plugins import load_function
from evomerge.fitness.result import split_result

FitnessFn = Callable[[Any, Any, Any], Any]

FITNESS_FUNCTIONS: dict[str, FitnessFn] = {
    "classification_accuracy": classification_accuracy,
    "multiple_choice_loglik": multiple_choice_loglik,
    "negative_cross_entropy": negative_cross_entropy,
    "exact_match": exact_match,
    "judge": judge,
    "lm_eval": lm_eval_fitness,
}

EXAMPLE_SOURCES: dict[str, Callable[..., Any]] = {"lm_eval": lm_eval_documents}
"""Fitness functions that bring their own examples, each with ``fn(**options) -> examples``."""

ENTRY_POINT_GROUP = "evomerge.fitness"

OPTION_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"judge": check_judge_options}
"""Built-ins whose options hold more than a signature can check (the judge's spec), checked
when the run starts and by ``evomerge validate``, in both modes (the names are shared)."""

SCORE_RANGES: dict[str, tuple[float, float] | None] = {
    "classification_accuracy": (0.0, 1.0),
    "multiple_choice_loglik": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
    "judge": (0.0, 1.0),
    "negative_cross_entropy": None,
    "lm_eval": None,  # acc and exact match are 0/1, log-likelihoods are not: the metric decides
}
"""The range every per-example score of a built-in lies in (None: unbounded), which racing's
bound uses unless ``fitness.racing.scores`` says otherwise."""

PLUGIN_SCORE_RANGE = (0.0, 1.0)
"""A plugin's assumed range (accuracies, pass rates); a score outside it stops the run naming
``fitness.racing.scores``."""


def score_range(name: str) -> tuple[float, float] | None:
    """The per-example score range fitness ``name`` declares (``fitness.racing.scores: auto``)."""
    return SCORE_RANGES[name] if name in FITNESS_FUNCTIONS else PLUGIN_SCORE_RANGE


API_USING_FITNESS = frozenset({"judge"})
"""Built-ins that ask a service of their own and report its usage (``FitnessResult.metrics``)."""


def may_spend_api_usage(name: str) -> bool:
    """Whether fitness ``name`` can report API usage for the run's requests/tokens/cost budgets:
    a built-in that asks a service, or a plugin (it may return a ``FitnessResult`` with usage)."""
    return name in API_USING_FITNESS or name not in FITNESS_FUNCTIONS


def resolve_fitness(name: str) -> FitnessFn:
    """A built-in, a ``module:function`` reference, or an entry point of ``evomerge.fitness``."""
    if name in FITNESS_FUNCTIONS:
        return FITNESS_FUNCTIONS[name]
    if ":" in name:
        return load_function(name, "fitness plugin")
    ep = _entry_point(name)
    if ep is None:
        raise _unknown(name)
    try:
        return ep.load()
    except Exception as exc:
        raise PluginError(f"fitness entry point '{name}' failed to load: {exc}") from None


def check_fitness_name(name: str) -> None:
    """Refuse, before a run starts, a name no worker could resolve; a plugin is not imported here,
    since it may live only on the workers' path."""
    if name not in FITNESS_FUNCTIONS and ":" not in name and _entry_point(name) is None:
        raise _unknown(name)


def _entry_point(name: str):
    return next((ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)


def _unknown(name: str) -> PluginError:
    module, dot, function = name.rpartition(".")
    if dot and module and function:  # a dotted path with the colon left out
        return PluginError(
            f"unknown fitness '{name}': a plugin is named 'package.module:function', with a colon"
            f" before the function; did you mean '{module}:{function}'?"
        )
    known = ", ".join(sorted(FITNESS_FUNCTIONS))
    return PluginError(
        f"unknown fitness '{name}': use a built-in ({known}), 'package.module:function',"
        f" or an entry point in the group '{ENTRY_POINT_GROUP}'"
    )


def brings_own_examples(name: str) -> bool:
    """Whether the fitness ``name`` reads no ``fitness.data`` (its examples come from its options)."""
    return name in EXAMPLE_SOURCES


def own_examples(name: str, options: dict[str, Any]) -> Any:
    """The examples a fitness brings itself, built from its options (once per process for lm_eval)."""
    source = EXAMPLE_SOURCES[name]
    try:
        inspect.signature(source).bind(**options)
    except TypeError as exc:  # a missing or unknown option: one line, not a traceback
        raise PluginError(f"fitness '{name}' options {sorted(options)}: {exc}") from None
    return source(**options)


def resolve_whitebox_fitness(name: str) -> FitnessFn:
    """A white-box fitness ``fn(model, tokenizer, examples)``: a built-in or a plugin that is not
    async (an async plugin is the black-box form; called here it would only make coroutines)."""
    fn = resolve_fitness(name)
    if inspect.iscoroutinefunction(fn):
        raise PluginError(
            f"fitness plugin '{name}' is async, the black-box form fn(model, examples) for runs with an api:"
            " section; white-box runs call a plain fn(model, tokenizer, examples)"
        )
    return fn


def resolve_blackbox_fitness(name: str) -> Callable[..., Any]:
    """A black-box fitness ``async fn(model, examples)``: a built-in of ``blackbox.py`` (the same
    names as the white-box language-model functions), or an async plugin."""
    from evomerge.fitness.blackbox import BLACKBOX_FITNESS_FUNCTIONS

    if name in BLACKBOX_FITNESS_FUNCTIONS:
        return BLACKBOX_FITNESS_FUNCTIONS[name]
    if name in FITNESS_FUNCTIONS:
        known = ", ".join(sorted(BLACKBOX_FITNESS_FUNCTIONS))
        raise PluginError(f"fitness '{name}' needs the model's weights; black-box runs (api:) score with {known}")
    fn = resolve_fitness(name)
    if not inspect.iscoroutinefunction(fn):
        raise PluginError(f"fitness plugin '{name}': black-box runs need an async function fn(model, examples)")
    return fn


def with_options(fn: FitnessFn, name: str, options: dict[str, Any]) -> FitnessFn:
    """``fn`` with the config's ``fitness.options`` bound as keyword arguments.

    Checked against the signature once, so a function that cannot be called as a fitness (too
    few or too many positional parameters, an option it does not take) stops the run with one
    message instead of failing every candidate with a TypeError.
    """
    if name in OPTION_CHECKS:
        OPTION_CHECKS[name](options)
    blackbox = inspect.iscoroutinefunction(fn)
    call = "async fn(model, examples)" if blackbox else "fn(model, tokenizer, examples)"
    positional = [None] * (2 if blackbox else 3)
    try:
        signature = inspect.signature(fn)
    except ValueError:  # no signature to check (some builtins): let the call decide
        return functools.partial(fn, **options) if options else fn
    try:
        signature.bind_partial(*positional)
    except TypeError as exc:
        raise PluginError(f"fitness '{name}' must be callable as {call}: {exc}") from None
    try:
        signature.bind(*positional, **options)
    except TypeError as exc:
        if options:
            takes = [p.name for p in list(signature.parameters.values())[len(positional):]
                     if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            known = f"it takes {', '.join(takes)}" if takes else "it takes no options"
            raise PluginError(f"fitness '{name}' does not accept options {sorted(options)}: {exc} ({known})") from None
        raise PluginError(f"fitness '{name}' must be callable as {call} (fitness.options as keywords): {exc}") from None
    return functools.partial(fn, **options) if options else fn


def scores_and_metrics(raw: Any, n_examples: int, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A fitness function's return value as validated per-example scores and the metrics it
    reported (a :class:`~evomerge.fitness.result.FitnessResult`'s usage; none for bare scores)."""
    scores, metrics = split_result(raw)
    return per_example_scores(scores, n_examples, name), metrics


def per_example_scores(raw: Any, n_examples: int, name: str) -> np.ndarray:
    """Validate a fitness function's return value: one finite-or-NaN float per example."""
    if raw is None:
        raise PluginError(f"fitness '{name}' returned None, expected one score per example ({n_examples} numbers)")
    try:
        scores = np.asarray(raw.detach().cpu() if hasattr(raw, "detach") else raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise PluginError(f"fitness '{name}' returned {type(raw).__name__}, expected one score per example") from None
    if scores.ndim == 0:  # the mean, most likely: M2N2 and racing need the scores it was taken over
        raise PluginError(
            f"fitness '{name}' returned a single number ({float(scores):g}), expected one score per example"
            f" ({n_examples} numbers): return the per-example scores, not their mean"
        )
    if scores.shape != (n_examples,):
        raise PluginError(
            f"fitness '{name}' returned scores of shape {scores.shape}, expected ({n_examples},): one per example"
        )
    return scores


__all__ = [
    "FITNESS_FUNCTIONS",
    "FitnessFn",
    "brings_own_examples",
    "may_spend_api_usage",
    "own_examples",
    "per_example_scores",
    "resolve_blackbox_fitness",
    "resolve_fitness",
    "resolve_whitebox_fitness",
    "scores_and_metrics",
    "with_options",
]
