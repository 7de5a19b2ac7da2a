"""Starting and inspecting runs: the composition the CLI calls.

``start_run`` wires config → space → strategies → executor → controller → store; ``run_status``
reads a run directory (also while the run is writing it). Exporting is ``evomerge.export``.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from evomerge.config import PopulationConfig, RunConfig, check_files, config_from_dict, resolve_deadline
from evomerge.controller import Controller, Population, Progress, population_front
from evomerge.errors import ConfigError, RunDirError
from evomerge.executors import Executor, make_executor
from evomerge.models.loading import parameter_names
from evomerge.space import Space
from evomerge.store import RunStore
from evomerge.strategies import SearchSpec, make_strategy
from evomerge.strategies.seed_recipes import SeedGram
from evomerge.workers.jobs import BlockGrams, ExpertBaselines, SeedResponses



def resolved_config_dict(config: RunConfig) -> dict[str, Any]:
    """The config with every local path made absolute: the snapshot a run directory keeps."""
    data = config.model_dump(mode="json")
    models = data["models"]
    local = {ref for _, ref in config.local_models()}
    if models["base"] in local:
        models["base"] = config.model_ref(models["base"])
    for expert in models["experts"]:
        if expert["path"] in local:
            expert["path"] = config.model_ref(expert["path"])
    if config.api is not None and config.api.adapter_dir is not None:
        data["api"]["adapter_dir"] = str(config.resolve_path(config.api.adapter_dir))
    for key in ("data", "test_data"):
        spec = data["fitness"].get(key)
        if spec and not spec["source"].startswith("sklearn:"):
            spec["source"] = str(config.resolve_path(spec["source"]))
    data["run_dir"] = str(config.run_path())
    return data


def load_run_config(store: RunStore) -> RunConfig:
    data = yaml.safe_load(store.config_yaml())
    return config_from_dict(data, str(store.run_dir / "config.yaml"), store.run_dir)


def _search_spec(population: PopulationConfig, space: Space, executor: Executor) -> SearchSpec:
    """The population's view of the search: the merge space, or M2N2's seed recipes."""
    grid = population.seed_recipe_grid()
    if grid is None:
        return space.search_spec()
    try:
        edges, grams = executor.run_once(BlockGrams(grid))
    except ValueError as exc:  # e.g. an element grid on a model too large for it
        raise ConfigError(f"populations '{population.name}': {exc}") from None
    return SearchSpec.seed_recipes(SeedGram.from_block_grams(edges, grams))


LOG_NAME = "run.log"


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        return json.dumps(entry)


@contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Everything evomerge logs during a session, as JSON lines appended to ``run.log``."""
    handler = logging.FileHandler(Path(run_dir) / LOG_NAME)
    handler.setFormatter(_JsonLines())
    console = logging.StreamHandler()  # warnings (lost workers, timeouts) still reach the terminal
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("evomerge")
    previous = logger.level
    logger.addHandler(handler)
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(console)
        logger.setLevel(previous)
        handler.close()


@contextmanager
def _session(store: RunStore, executor: Executor) -> Iterator[None]:
    """A run's session: a failure marks the run failed (resumable); workers and store are released."""
    try:
        yield
    except BaseException as exc:
        store.set_state("failed", {"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        executor.shutdown()
        store.close()


def _score_experts(store: RunStore, config: RunConfig, executor: Executor) -> None:
    """Record each expert's own fitness once per run (``score_experts``), before the search, so
    the report can set the best merge beside them while the run goes; a resume scores them only
    if the run has none yet."""
    if not config.score_experts or store.baselines():
        return
    for ev in executor.run_once(ExpertBaselines()):
        store.add_baseline(ev.candidate_id, ev)


def _strategies(config: RunConfig, source: str, executor: Executor) -> tuple[Space, list]:
    """The run's space and one fresh strategy per population (a resume builds the same ones)."""
    try:
        tensor_names = [] if config.api is not None else parameter_names(config.working_model_ref())  # black-box: α/β per adapter
        space = config.merge.build_space(tensor_names, len(config.models.experts))
    except ValueError as exc:  # e.g. per_layer_group on a model without numbered layers
        raise ConfigError(f"{source}: merge: {exc}") from None
    strategies = [
        make_strategy(p.strategy, p.name, _search_spec(p, space, executor), config.seed + 1000 * i, p.options)
        for i, p in enumerate(config.populations)
    ]
    return space, strategies


def _drive(
    store: RunStore,
    config: RunConfig,
    executor: Executor,
    strategies: list,
    on_progress: Callable[[Progress], None] | None,
    resume: bool,
) -> dict[str, Any]:
    budgets = config.population_budgets()
    populations = [
        Population(p.name, strategy, budgets[p.name], p.share, cache_scope=f"seed_recipes:{grid}" if grid else "space")
        for p, strategy in zip(config.populations, strategies)
        for grid in [p.seed_recipe_grid()]
    ]
    controller = Controller(
        store,
        executor,
        populations,
        max_time=config.budget.max_time,
        checkpoint_every=config.checkpoint_every,
        on_progress=on_progress,
        deadline=config.budget.deadline_timestamp(),
        target_fitness=config.budget.target_fitness,
        patience=config.budget.patience,
        migration=None if config.migration is None else (config.migration.every, config.migration.size),
        usage_limits=config.budget.usage_limits(),
    )
    with run_log(store.run_dir):
        if resume:
            controller.restore()
            controller._event("run_resumed", f"{sum(p.finished for p in populations)} evaluations recorded")
        store.set_state("running")
        return controller.run()


def start_run(
    config: RunConfig,
    source: str,
    run_dir: Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_ready: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Run a search to the end of its budget; returns the summary also stored in the run."""
    if run_dir is not None:
        config.run_dir = str(Path(run_dir).resolve())
    if config.budget.deadline is not None:  # "07:00" means tonight's 07:00, also after a resume
        config.budget.deadline = resolve_deadline(config.budget.deadline).isoformat(timespec="seconds")
    check_files(config, source)
    path = config.run_path()
    if (path / "run.db").exists():
        raise RunDirError(f"{path} already holds a run; choose another --run-dir or remove it")
    executor = make_executor(config)
    try:
        space, strategies = _strategies(config, source, executor)
        store = RunStore(path, create=True)
    except BaseException:
        executor.shutdown()
        raise
    with _session(store, executor):
        store.init_run(config.name, yaml.safe_dump(resolved_config_dict(config), sort_keys=False), config.budget.model_dump())
        budgets = config.population_budgets()
        for p in config.populations:
            store.add_population(
                p.name,
                p.strategy,
                budgets[p.name],
                {"method": space.method.name, "granularity": space.granularity, "dim": space.dim, "groups": space.group_names},
            )
        if on_ready is not None:
            on_ready(path)
        _score_experts(store, config, executor)
        return _drive(store, config, executor, strategies, on_progress, resume=False)


def resume_run(
    run_dir: Path,
    on_progress: Callable[[Progress], None] | None = None,
    adjust: Callable[[RunConfig], None] | None = None,
) -> dict[str, Any]:
    """Continue a run stopped in any way (signal, deadline, crash, SIGKILL) from its run directory.

    The config is the run's own snapshot, so the strategies are rebuilt with the same seeds; they
    load their checkpoint and replay what was recorded after it (see ``Controller.restore``).
    ``adjust`` may change this session's limits and placement (a new deadline, another cluster).
    """
    store = RunStore(run_dir)
    try:
        info = store.run_info()
        if info["state"] == "finished":
            summary = info["summary"] or {}
            raise RunDirError(
                f"{run_dir}: the run already finished ({summary.get('stop_reason', 'budget exhausted')}); nothing to resume"
            )
        config = load_run_config(store)
        if adjust is not None:
            adjust(config)
        if config.budget.deadline is not None:
            config.budget.deadline = resolve_deadline(config.budget.deadline).isoformat(timespec="seconds")
    except BaseException:
        store.close()
        raise
    source = str(Path(run_dir) / "config.yaml")
    try:  # black-box workers start from the answers the run recorded: none is asked for twice
        executor = make_executor(config, SeedResponses(store.api_responses()) if config.api is not None else None)
    except BaseException:
        store.close()
        raise
    with _session(store, executor):
        _, strategies = _strategies(config, source, executor)
        _score_experts(store, config, executor)
        return _drive(store, config, executor, strategies, on_progress, resume=True)


def run_status(run_dir: Path) -> dict[str, Any]:
    """A JSON-ready snapshot of a run, safe to take while the run writes."""
    store = RunStore(run_dir, readonly=True)
    try:
        info = store.run_info()
        counts = store.counts()
        objectives = {p.name: p.options.get("objectives") for p in load_run_config(store).populations}
        populations = []
        for pop in store.populations():
            best = store.best(pop["name"])
            c = counts.get(pop["name"], {})
            populations.append(
                {
                    "name": pop["name"],
                    "strategy": pop["strategy"],
                    "budget": pop["budget"],
                    "evaluations": sum(c.values()),
                    "failed": c.get("failed", 0),
                    "best_fitness": None if best is None else best.fitness,
                    **population_front(store, pop["name"], objectives.get(pop["name"])),
                }
            )
        best = store.best()
        total_ok = sum(c.get("ok", 0) for c in counts.values())
        total = sum(sum(c.values()) for c in counts.values())
        return {
            "run_dir": str(Path(run_dir).resolve()),
            "name": info["name"],
            "state": info["state"],
            "created": info["created"],
            "updated": info["updated"],
            "elapsed_seconds": round(info["updated"] - info["created"], 3),
            "evaluations": {"total": total, "ok": total_ok, "failed": total - total_ok},
            "budget": info["budget"],
            "best": None
            if best is None
            else {"candidate_id": best.candidate_id, "population": best.population, "fitness": best.fitness},
            "populations": populations,
            "stop_reason": (info["summary"] or {}).get("stop_reason"),
        }
    finally:
        store.close()
