"""Starting and inspecting runs: the composition the CLI calls.

``start_run`` wires config → plan → executor → strategies → controller → store; ``run_status``
reads a run directory (also while the run is writing it). Exporting is ``evomerge.export``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from evomerge import run_identity
from evomerge.budget import Budget, BudgetState, failures_at_start_limit, pin_deadline
from evomerge.config import RunConfig, config_from_dict, load_config
from evomerge.controller import Controller, Population, Progress, population_front
from evomerge.errors import DiskError, RunChangedError, RunDirError
from evomerge.executors import Executor, make_executor
from evomerge.fitness.data import DATA_SCHEMES
from evomerge.plan import RunPlan
from evomerge.records import Evaluation
from evomerge.store import CONFIG_NAME, RunStore, disk_faults
from evomerge.workers.jobs import ExpertBaselines, SeedResponses


def resolved_config_dict(plan: RunPlan) -> dict[str, Any]:
    """The config with every local path made absolute: the snapshot a run directory keeps."""
    config = plan.config
    data = config.model_dump(mode="json")
    models = data["models"]
    local = {ref for _, ref in plan.local_models()}
    if models["base"] in local:
        models["base"] = config.model_ref(models["base"])
    for expert in models["experts"]:
        if expert["path"] in local:
            expert["path"] = config.model_ref(expert["path"])
        for recorded in ("run", "recipe"):  # a recorded merge (data-flow source): its directory or file
            if expert[recorded] is not None:
                expert[recorded] = str(config.resolve_path(expert[recorded]))
    if config.api is not None and config.api.adapter_dir is not None:
        data["api"]["adapter_dir"] = str(config.resolve_path(config.api.adapter_dir))
    fitness = data["fitness"]
    sections = [fitness[key] for key in ("data", "test_data")] + list(fitness["tasks"].values())
    sections += [expert["data"] for expert in models["experts"]]
    for spec in sections:
        if spec is not None and not spec["source"].startswith(DATA_SCHEMES):
            spec["source"] = str(config.resolve_path(spec["source"]))
    data["run_dir"] = str(config.run_path())
    return data


def load_run_config(store: RunStore) -> RunConfig:
    """The config the run started with: what status, report and export read, so they decode the
    recorded genomes in the run's own space whatever config.yaml says now. A run directory
    written before the started config was kept has config.yaml as its only copy."""
    started = store.started_config_yaml()
    if started is None:
        return load_config(store.run_dir / CONFIG_NAME)
    return config_from_dict(yaml.safe_load(started), f"{store.db_path} (the config the run started with)", store.run_dir)


def recorded_best(run_dir: Path) -> tuple[Evaluation | None, RunConfig]:
    """A run's best evaluation (None before any succeeded) and the config it started with, read
    without writing: how a data-flow run finds a parameter-space run's best merge (PS+DFS)."""
    store = RunStore(run_dir, readonly=True)
    try:
        return store.best(), load_run_config(store)
    finally:
        store.close()


def _config_to_resume(store: RunStore) -> RunConfig:
    """config.yaml as it is now, provided it searches what the run started with: a resume takes
    its harmless edits (``run_identity.HARMLESS_FIELDS``) and refuses any other, naming it."""
    path = store.run_dir / CONFIG_NAME
    current = load_config(path)
    if store.started_config_yaml() is None:  # written before the started config was kept
        store.record_started_config(path.read_text())
        return current
    changed = run_identity.changes(load_run_config(store), current)
    if changed:
        field, detail = changed[0]
        more = f" and {len(changed) - 1} more field(s)" if len(changed) > 1 else ""
        raise RunChangedError(
            f"{path}: {field} changed since the run started ({detail}){more}; a resume runs the search the run"
            " started with: restore it, or start a new run with evomerge run"
        )
    return current


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


class _RunLogFile(logging.FileHandler):
    """``run.log``, whose lines are dropped with one warning once it cannot be written (a full
    disk), instead of a traceback per line: the run store, which names the fault itself when it
    cannot write, is what a resume needs; the log is for reading."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._broken = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self._broken:
            self._broken = True
            sys.stderr.write(f"warning: cannot write {self.baseFilename} ({sys.exc_info()[1]}); the run goes on without it\n")


@contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Everything evomerge logs during a session, as JSON lines appended to ``run.log``."""
    with disk_faults(Path(run_dir)):
        handler = _RunLogFile(Path(run_dir) / LOG_NAME)
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
    """A run's session: a failure marks the run failed, a signal before the search (while Ray
    starts or experts are scored; the search handles its own) marks it interrupted, both
    resumable; workers and store (and with it the run directory's lock) are released."""
    try:
        yield
    except KeyboardInterrupt as exc:
        with suppress(DiskError):  # a full disk refuses this note too; the run resumes all the same
            store.set_state("interrupted", {"stop_reason": f"signal {exc or 'SIGINT'} before the search"})
        raise
    except BaseException as exc:
        with suppress(DiskError):
            store.set_state("failed", {"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        executor.shutdown()
        store.close()


def _score_experts(store: RunStore, config: RunConfig, executor: Executor, on_phase: Callable[[str], None]) -> None:
    """Record each expert's own fitness once per run (``score_experts``), before the search, so
    the report can set the best merge beside them while the run goes; a resume scores them only
    if the run has none yet."""
    if not config.score_experts or store.baselines():
        return
    on_phase("scoring the experts")
    for ev in executor.run_once(ExpertBaselines()):
        store.add_baseline(ev.candidate_id, ev)


def _drive(
    store: RunStore,
    plan: RunPlan,
    executor: Executor,
    strategies: list,
    on_progress: Callable[[Progress], None] | None,
    resume: bool,
) -> dict[str, Any]:
    config = plan.config
    populations = [
        Population(p.name, strategy, p.budget, p.share, cache_scope=p.cache_scope)
        for p, strategy in zip(plan.populations, strategies)
    ]
    controller = Controller(
        store,
        executor,
        populations,
        Budget.from_config(config.budget),
        checkpoint_every=config.checkpoint_every,
        on_progress=on_progress,
        migration=None if config.migration is None else (config.migration.every, config.migration.size),
        grace_period=config.workers.grace_period,
        max_failures_at_start=failures_at_start_limit(config.budget, executor.capacity),
        racing_top_k=None if config.fitness.racing is None else config.fitness.racing.top_k,
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
    on_phase: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Run a search to the end of its budget; returns the summary also stored in the run.
    ``on_phase`` hears what the run is doing before the search (starting Ray, loading models)."""
    if run_dir is not None:
        config.run_dir = str(Path(run_dir).resolve())
    pin_deadline(config.budget)  # "07:00" means tonight's 07:00, also after a resume
    plan = RunPlan.from_config(config, source)
    plan.check_files()
    path = config.run_path()
    # The run directory's one writer from here to the end of the session: a second run on the
    # same directory is refused before either writes the run, and never writes into this one.
    store = RunStore(path, create=True)
    try:
        executor = make_executor(config, None, on_phase)
        try:
            space, strategies = plan.strategies(executor)
        except BaseException:
            executor.shutdown()
            raise
    except BaseException:
        store.discard()  # refused before it started: no run is left behind to resume
        raise
    with _session(store, executor):
        store.init_run(config.name, yaml.safe_dump(resolved_config_dict(plan), sort_keys=False), config.budget.model_dump())
        for p, pop in zip(config.populations, plan.populations):
            store.add_population(
                p.name,
                p.strategy,
                pop.budget,
                space.summary(),
            )
        if on_ready is not None:
            on_ready(path)
        _score_experts(store, config, executor, on_phase)
        return _drive(store, plan, executor, strategies, on_progress, resume=False)


def resume_run(
    run_dir: Path,
    on_progress: Callable[[Progress], None] | None = None,
    adjust: Callable[[RunConfig], None] | None = None,
    on_phase: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Continue a run stopped in any way (signal, deadline, crash, SIGKILL) from its run directory.

    The config is the run's own snapshot (config.yaml, refused if it no longer searches what the
    run started with), so the strategies are rebuilt with the same seeds; they load their
    checkpoint and replay what was recorded after it (see ``Controller.restore``).
    ``adjust`` may change this session's limits and placement (a new deadline, another cluster).
    """
    store = RunStore(run_dir)  # the run directory's one writer until the session ends
    try:
        info = store.run_info()
        config = _config_to_resume(store)
        if adjust is not None:
            adjust(config)
        pin_deadline(config.budget)
        plan = RunPlan.from_config(config, str(Path(run_dir) / "config.yaml"))
        if info["state"] == "finished":
            _refuse_unless_reopened(store, plan, (info["summary"] or {}).get("stop_reason", "budget exhausted"))
        # black-box workers start from the answers the run recorded: none is asked for twice
        setup = SeedResponses(store.api_responses()) if config.api is not None else None
        executor = make_executor(config, setup, on_phase)
    except BaseException:
        store.close()
        raise
    with _session(store, executor):
        _, strategies = plan.strategies(executor)
        _score_experts(store, config, executor, on_phase)
        return _drive(store, plan, executor, strategies, on_progress, resume=True)


STRATEGIES_STOPPED = "all populations stopped"
"""The stop reason of a run whose strategies all stopped themselves (converged): no limit reopens it."""


def _refuse_unless_reopened(store: RunStore, plan: RunPlan, stop_reason: str) -> None:
    """A finished run goes on when the limits now in force (config.yaml as edited, ``--max-time``,
    ``--deadline``) no longer stop it, as an Optuna study takes more trials: its strategies continue
    from their state rather than a new run starting cold. With the limits it finished under it is
    "nothing to resume", so a cron line that resumes every night stays safe."""
    reached = STRATEGIES_STOPPED if stop_reason == STRATEGIES_STOPPED else _limit_in_force(store, plan)
    if reached is None:
        store.log_event("run_reopened", f"it had finished ({stop_reason}); the limits now in force let it go on")
        return
    how = (
        "its strategies stopped themselves; a longer search is a new run"
        if reached == STRATEGIES_STOPPED
        else f"{reached} under the limits now in force; raise that limit (budget in {CONFIG_NAME}, or resume"
        " --max-time) to go on"
    )
    raise RunDirError(f"{store.run_dir}: the run already finished ({stop_reason}); nothing to resume: {how}")


def _limit_in_force(store: RunStore, plan: RunPlan) -> str | None:
    """Which limit of ``plan`` a recorded run has reached (the words its summary would use), or None."""
    info = store.run_info()
    asked = {name: count for name, (count, _) in store.evaluation_counts().items()}
    best = store.best()
    state = BudgetState(
        info["active_seconds"], time.time(), sum(asked.values()),
        None if best is None else best.fitness, 0 if best is None else best.seq, store.api_usage(),
    )
    budget = Budget.from_config(plan.config.budget)
    reasons = budget.stop(state)
    if reasons:
        return budget.describe(reasons, state)
    spent = [limit is not None and asked.get(name, 0) >= limit for name, limit in plan.budgets.items()]
    return "budget exhausted" if all(spent) else None


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
        cancelled = sum(c.get("cancelled", 0) for c in counts.values())
        total = sum(sum(c.values()) for c in counts.values())
        return {
            "run_dir": str(Path(run_dir).resolve()),
            "name": info["name"],
            "state": info["state"],
            "created": info["created"],
            "updated": info["updated"],
            "wall_seconds": round(info["updated"] - info["created"], 3),
            "search_seconds": round(info["active_seconds"], 3),
            "evaluations": {
                "total": total, "ok": total_ok, "failed": total - total_ok - cancelled, "cancelled": cancelled
            },
            "budget": info["budget"],
            "examples_scored": store.api_usage()["examples"],
            "stopped_early": store.stopped_early(),
            "best": None
            if best is None
            else {"candidate_id": best.candidate_id, "population": best.population, "fitness": best.fitness},
            "populations": populations,
            "stop_reason": (info["summary"] or {}).get("stop_reason"),
            "error": (info["summary"] or {}).get("error"),
        }
    finally:
        store.close()
