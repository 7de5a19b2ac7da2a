"""Reading a run directory for analysis: ``load_run`` and the tables a report is drawn from.

``evomerge.load_run(path)`` returns the run's evaluations as a pandas DataFrame, one row per
scored candidate, so a notebook can slice a run like any table. The other functions derive what
the HTML report (``evomerge report``) shows: progress curves, worker utilisation, failures, API
usage, the M2N2 archive's diversity over time, the best recipe and the experts beside the best
merge. Everything reads the run store read-only, so it works while the run is still writing,
and reads no model weights (the recipe is placed on the model from its config alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evomerge.records import Evaluation
from evomerge.store import RunStore

MEDIAN_WINDOW = 20
"""Evaluations in the rolling median of a population's progress curve: its recent state, not
its whole history (which the early, random candidates would hold down)."""

USAGE_PREFIX = "usage."
"""Black-box workers (and a fitness that asks an API: the judge) record API usage as
``metrics["usage"] = {"requests", "prompt_tokens", "completion_tokens", "cost"}``; flattened, those
become the ``usage.*`` columns."""


EVALUATION_COLUMNS = ["seq", "candidate_id", "population", "strategy", "status", "fitness", "fidelity", "worker",
                      "started", "finished", "duration", "elapsed", "error"]
"""The columns every ``load_run`` frame has, also before the first evaluation is recorded (the
metrics' columns come from the evaluations)."""


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            out[key] = value
    return out


def load_run(path: str | Path, per_example: bool = False) -> pd.DataFrame:
    """The evaluations of the run in ``path``, in the order they were recorded.

    Columns: ``seq``, ``candidate_id``, ``population``, ``strategy``, ``status`` (ok / failed),
    ``fitness`` (NaN when failed), ``fidelity`` (the fraction of the fitness examples scored: below 1
    when racing stopped the candidate early, its fitness then an estimate from those), ``worker``, ``started`` and ``finished`` (Unix seconds),
    ``duration``, ``elapsed`` (seconds from the run's start to the result), ``error``, and one
    column per metric the workers recorded (``merge_seconds``, ``score_seconds``, ``examples_scored``, ``traceback``,
    ``cached_from``, ``usage.cost`` …). ``per_example=True`` adds the per-example scores as
    arrays. ``df.attrs`` holds the run's ``run_dir``, ``name``, ``state``, ``created``,
    ``updated`` and ``strategies`` (population → strategy). Safe while the run writes.
    """
    store = RunStore(Path(path), readonly=True)
    try:
        info = store.run_info()
        strategies = {p["name"]: p["strategy"] for p in store.populations()}
        rows = [_row_record(r, strategies, info["created"], per_example) for r in store.evaluations(with_scores=per_example)]
    finally:
        store.close()
    frame = pd.DataFrame.from_records(rows) if rows else pd.DataFrame(
        columns=EVALUATION_COLUMNS + (["per_example"] if per_example else [])
    )
    frame = frame.astype({c: float for c in ("fitness", "fidelity", "started", "finished", "duration", "elapsed")})
    frame.attrs.update(
        run_dir=str(Path(path).resolve()),
        name=info["name"],
        state=info["state"],
        created=info["created"],
        updated=info["updated"],
        strategies=strategies,
    )
    return frame


def _row_record(r: Evaluation, strategies: dict[str, str], created: float, per_example: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "seq": r.seq,
        "candidate_id": r.candidate_id,
        "population": r.population,
        "strategy": strategies.get(r.population, ""),
        "status": str(r.status),
        "fitness": r.fitness if math.isfinite(r.fitness) else math.nan,
        "fidelity": r.fidelity,
        "worker": r.worker,
        "started": r.started,
        "finished": r.started + r.duration,
        "duration": r.duration,
        "elapsed": r.started + r.duration - created,
        "error": r.error,
        **_flat_metrics(r.metrics),
    }
    if per_example:
        record["per_example"] = r.per_example
    return record


def progress_curves(evaluations: pd.DataFrame, window: int = MEDIAN_WINDOW) -> pd.DataFrame:
    """Per population and evaluation: the best fitness so far and the median of the last ``window``.

    Columns ``population``, ``evaluation`` (1, 2, … within the population), ``elapsed``,
    ``fitness``, ``best``, ``median``; failed evaluations, and those racing stopped early (their
    fitness is a mean over part of the examples, not comparable with full scores), count as
    evaluations but not as values of ``best`` and ``median``.
    """
    parts = []
    for population, group in evaluations.sort_values("seq").groupby("population", sort=False):
        fitness = group["fitness"]
        full = fitness.where(group["fidelity"] >= 1.0)
        parts.append(
            pd.DataFrame(
                {
                    "population": population,
                    "evaluation": np.arange(1, len(group) + 1),
                    "elapsed": group["elapsed"].to_numpy(),
                    "fitness": fitness.to_numpy(),
                    "best": full.cummax().ffill().to_numpy(),
                    "median": full.rolling(window, min_periods=1).median().to_numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["population", "evaluation", "elapsed", "fitness", "best", "median"]
    )


def worker_utilisation(evaluations: pd.DataFrame, bins: int = 60) -> pd.DataFrame:
    """The share of each time bin every worker spent scoring, from evaluations' start and duration.

    Index: bin starts in seconds from the run's start; one column per worker; values 0 … 1.
    Reused results (``worker == "cache"``) took no worker's time and are left out.
    """
    work = evaluations[(evaluations["worker"] != "cache") & (evaluations["duration"] > 0)]
    if work.empty:
        return pd.DataFrame()
    created = evaluations.attrs.get("created", float(work["started"].min()))
    start = work["started"].to_numpy() - created
    end = start + work["duration"].to_numpy()
    edges = np.linspace(min(start.min(), 0.0), end.max(), bins + 1)
    width = edges[1] - edges[0]
    busy = {}
    for worker in sorted(work["worker"].unique()):
        mine = (work["worker"] == worker).to_numpy()
        overlap = np.minimum(end[mine, None], edges[None, 1:]) - np.maximum(start[mine, None], edges[None, :-1])
        busy[worker] = np.clip(overlap, 0.0, None).sum(axis=0) / width
    return pd.DataFrame(busy, index=pd.Index(edges[:-1], name="elapsed")).clip(upper=1.0)


def failures(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Failed evaluations grouped by reason: how many, in which populations, one candidate and
    the end of its traceback (when the worker caught one)."""
    failed = evaluations[evaluations["status"] != "ok"]
    columns = ["error", "count", "populations", "example", "traceback"]
    if failed.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for error, group in failed.groupby(failed["error"].fillna("(no reason recorded)"), sort=False):
        first = group.iloc[0]
        trace = first.get("traceback") if "traceback" in group else None
        rows.append(
            {
                "error": error,
                "count": len(group),
                "populations": ", ".join(sorted(group["population"].unique())),
                "example": first["candidate_id"],
                "traceback": trace if isinstance(trace, str) else "",
            }
        )
    return pd.DataFrame(rows, columns=columns).sort_values("count", ascending=False, ignore_index=True)


def api_usage(evaluations: pd.DataFrame) -> pd.DataFrame | None:
    """API requests, tokens and cost per population (and in total); None for white-box runs."""
    columns = [c for c in evaluations.columns if c.startswith(USAGE_PREFIX)]
    if not columns:
        return None
    usage = evaluations[["population", *columns]].fillna({c: 0 for c in columns})
    table = usage.groupby("population")[columns].sum()
    table.loc["total"] = table.sum()
    return table.rename(columns=lambda c: c[len(USAGE_PREFIX) :])


# --- M2N2: the archive over time ---------------------------------------------------------------
def archive_history(path: str | Path) -> pd.DataFrame:
    """Training coverage and mean per-example entropy of every M2N2 / GA archive, after each of
    its evaluations (the paper's two diversity measures).

    The store keeps only each population's latest checkpoint, so the history is rebuilt: a fresh
    strategy of the population's own kind and options is offered the recorded evaluations in the
    order they were recorded — its own, and the migrants the run took in (``migration``) — and
    applies the strategy's own replace-the-worst rule, so the archive is the run's at every step.
    Its breeding is never used, hence it needs no search space. Columns: ``population``,
    ``evaluation`` (within the population), ``seq``, ``coverage``, ``entropy``, ``members``.
    """
    from evomerge.plan import RunPlan
    from evomerge.runs import load_run_config
    from evomerge.space.genes import SearchSpec
    from evomerge.strategies import STRATEGIES, make_strategy
    from evomerge.strategies.m2n2 import M2N2

    store = RunStore(Path(path), readonly=True)
    try:
        config = load_run_config(store)
        replicas: dict[str, M2N2] = {
            p.name: make_strategy(p.strategy, p.name, SearchSpec.unit_cube(1), 0, {**p.options, "archive": "genomes"})
            for p in config.populations
            if issubclass(STRATEGIES[p.strategy], M2N2)
        }
        rows: list[dict[str, Any]] = []
        counts = dict.fromkeys(replicas, 0)
        scope = {p.name: p.cache_scope for p in RunPlan.from_config(config).populations}
        for row in store.evaluations(with_scores=True) if replicas else ():
            if row.population in replicas:
                replicas[row.population].immigrate(row.genome, row)
                counts[row.population] += 1
                stats = replicas[row.population].archive_stats()
                rows.append({"population": row.population, "evaluation": counts[row.population], "seq": row.seq, **stats})
            if config.migration is not None and row.seq % config.migration.every == 0:
                for name, replica in replicas.items():  # as Controller._migrate: the others' best so far
                    for other in scope:
                        if other != name and scope[other] == scope[name]:
                            for migrant in store.top(other, config.migration.size, row.seq):
                                replica.immigrate(migrant.genome, migrant)
    finally:
        store.close()
    return pd.DataFrame(rows, columns=["population", "evaluation", "seq", "coverage", "entropy", "members"])


# --- the best recipe ---------------------------------------------------------------------------
@dataclass
class BestRecipe:
    """The best candidate's recipe as tables: one per searched parameter, layer group × model
    (or × the parameter itself, for parameters shared by every model), and the fixed values."""

    candidate_id: str
    population: str
    fitness: float
    tables: dict[str, pd.DataFrame]
    fixed: dict[str, float]


def best_recipe(path: str | Path) -> BestRecipe | None:
    """The best candidate's recipe, decoded from its genome and the run's config (no weights read).

    Merge-space genomes decode through the run's space (black-box runs': one value per expert);
    a data-flow path is the layers it passes, in order, with their scales. M2N2 seed recipes are pieces of the
    flattened parameters with one weight per expert; per layer (per tensor in models without
    numbered layers) the table holds each expert's weight averaged over the layer's parameters.
    """
    from evomerge.models.loading import parameter_shapes
    from evomerge.plan import RunPlan
    from evomerge.runs import load_run_config

    store = RunStore(Path(path), readonly=True)
    try:
        best = store.best()
        config = load_run_config(store) if best is not None else None
    finally:
        store.close()
    if best is None or config is None:
        return None
    plan = RunPlan.from_config(config)
    labels = config.models.expert_labels()
    if plan.dataflow:  # a path through the experts' layers: one row per layer passed, its scale
        path = plan.path_space().decode(best.genome)
        steps = [f"{k}: {labels[source]} layer {layer}" for k, (source, layer) in enumerate(path.layers, 1)]
        tables = {"scale": pd.DataFrame({"scale": path.scales}, index=pd.Index(steps, name="path"))}
        return BestRecipe(best.candidate_id, best.population, float(best.fitness), tables, {})
    population = next(p for p in plan.populations if p.name == best.population)
    grid = population.requires.split_grid
    if grid is not None:  # seed recipes cover the merged tensors (frozen towers' are left out)
        shapes = parameter_shapes(plan.working_model)
        space = plan.space(list(shapes))
        merged = {name: shape for name, shape in shapes.items() if name in space.tensor_groups}
        tables = {"weight": _seed_recipe_table(best.genome, merged, grid, labels)}
        return BestRecipe(best.candidate_id, best.population, float(best.fitness), tables, {})
    space = plan.space(plan.tensor_names())  # none in black-box runs: one value per expert
    recipe = space.decode(best.genome)
    tables = {}
    for gene in space.genes:
        columns = labels if space.method.param(gene.name).per_model else [gene.name]
        tables[gene.name] = pd.DataFrame(recipe.values[gene.name], index=recipe.group_names, columns=columns)
    return BestRecipe(best.candidate_id, best.population, float(best.fitness), tables, dict(space.fixed))


def _seed_recipe_table(genome: np.ndarray, shapes: dict[str, tuple[int, ...]], grid: str, labels: list[str]) -> pd.DataFrame:
    from evomerge.space.merge_space import group_tensors
    from evomerge.space.seed_recipes import SeedRecipe, split_grid_edges

    recipe = SeedRecipe.decode(genome)
    edges = split_grid_edges(list(shapes.values()), grid)[recipe.edges]  # piece edges in elements
    names = list(shapes)
    try:
        group_names, groups = group_tensors(names, "per_layer_group", None)
    except ValueError:  # no numbered layers: one row per tensor
        group_names, groups = group_tensors(names, "per_tensor", None)
    sizes = np.array([int(np.prod(s)) for s in shapes.values()])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sums = np.zeros((len(group_names), recipe.n_seeds))
    for start, size, group in zip(starts, sizes, groups):
        overlap = np.clip(np.minimum(edges[1:], start + size) - np.maximum(edges[:-1], start), 0, None)
        sums[group] += overlap @ recipe.coeffs
    counts = np.bincount(groups, weights=sizes, minlength=len(group_names))
    return pd.DataFrame(sums / counts[:, None], index=group_names, columns=labels)


# --- the experts beside the best merge ---------------------------------------------------------
def expert_comparison(path: str | Path) -> pd.DataFrame:
    """The best merge, the base and each expert on the fitness data (scored alone once when the
    run starts, ``score_experts``): mean fitness, and on how many examples the best merge scores
    above, below or the same as the expert. Empty when the run did not score its experts."""
    store = RunStore(Path(path), readonly=True)
    try:
        baselines = store.baselines()
        best = store.best()
    finally:
        store.close()
    columns = ["model", "fitness", "merge_better", "merge_worse", "same"]
    if not baselines:
        return pd.DataFrame(columns=columns)
    rows = []
    if best is not None:
        rows.append({"model": f"best merge ({best.candidate_id})", "fitness": best.fitness})
    merged = None if best is None else best.per_example
    for b in baselines:
        row: dict[str, Any] = {"model": f"{b['role']} {b['name']}", "fitness": b["fitness"] if b["status"] == "ok" else math.nan}
        theirs = b["per_example"]
        if merged is not None and theirs is not None and len(theirs) == len(merged):
            row.update(
                merge_better=int(np.sum(merged > theirs)),
                merge_worse=int(np.sum(merged < theirs)),
                same=int(np.sum(merged == theirs)),
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def task_ratios(path: str | Path) -> pd.DataFrame:
    """Per task, the best merge's score and its ratio to the base's and each expert's (scored alone
    when the run started): ``fitness`` (the mean over ``fitness.data``), each task its examples
    name (``per_task``: a ``task`` field, lm-eval's tasks) and each data set of ``fitness.tasks``.

    A ratio is merged / reference, so 1.0 means the merge keeps that model's score on the task;
    it is NaN where the reference scores 0 or below (negative log-likelihoods, an expert with no
    right answer), where a ratio does not say better or worse. Empty when the run scored no
    baselines or has no fully scored candidate."""
    from evomerge.runs import load_run_config

    store = RunStore(Path(path), readonly=True)
    try:
        baselines = [b for b in store.baselines() if b["status"] == "ok"]
        best = store.best()
        config = load_run_config(store) if baselines and best is not None else None
    finally:
        store.close()
    if config is None or best is None:
        return pd.DataFrame()

    def scores(fitness: float, metrics: dict[str, Any]) -> dict[str, float]:
        named = {name: metrics[name] for name in config.fitness.tasks if isinstance(metrics.get(name), (int, float))}
        return {"fitness": fitness, **metrics.get("per_task", {}), **named}

    merged = scores(best.fitness, best.metrics)
    table = pd.DataFrame({"best merge": pd.Series(merged, dtype=float)})
    for b in baselines:
        theirs = pd.Series(scores(b["fitness"], b["metrics"]), dtype=float).reindex(table.index)
        table[f"÷ {b['role']} {b['name']}"] = (table["best merge"] / theirs).where(theirs > 0)
    table.index.name = "task"
    return table
