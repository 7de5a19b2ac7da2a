"""Reading a long run: `evomerge status`, `evomerge.load_run` and `evomerge report` on a store of
20,000 evaluations with 500 per-example scores each (two M2N2 populations, written through
``RunStore`` as the controller writes them; no model is loaded, the report's recipe reads the
tiny digits model's config only).

The floor, measured in the same run, is reading every evaluation with its scores from the store
(``RunStore.evaluations(with_scores=True)``): what any reader of the whole run pays. Each figure is
also given as a multiple of it. ``archive_history`` (the report's M2N2 section) is timed apart, as
is the same rebuild with the archive's statistics measured after every evaluation (what it cost
before ``M2N2.archive_stats`` kept them until the archive changes).

    python benchmarks/report_large_run.py --json [--evaluations 20000] [--examples 500]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from evomerge.records import Candidate, Evaluation, Status
from evomerge.store import RunStore


def write_run(folder: Path, evaluations: int, examples: int) -> Path:
    """Digits experts (trained in seconds) and a store of ``evaluations`` M2N2 evaluations, one in
    ten failed, scores 0/1 improving over the run as a search's do."""
    from evomerge.demo import prepare_digit_experts

    models = {name: folder / name for name in ("base", "low", "high")}
    prepare_digit_experts(models["base"], [models["low"], models["high"]], seed=0)
    run_dir = folder / "run"
    config = {
        "name": "long-run", "seed": 0, "run_dir": str(run_dir), "executor": "inline",
        "models": {"base": str(models["base"]), "experts": [str(models["low"]), str(models["high"])], "device": "cpu"},
        "merge": {"method": "task_arithmetic", "granularity": "per_layer_group", "search": ["weight"], "fixed": {"lambda": 1.0}},
        "populations": [{"name": "a", "strategy": "m2n2"}, {"name": "b", "strategy": "m2n2"}],
        "fitness": {"name": "classification_accuracy", "data": {"source": "sklearn:digits", "split": "train"}},
        "budget": {"evaluations": evaluations},
    }
    store = RunStore(run_dir, create=True)
    store.init_run("long-run", yaml.safe_dump(config), config["budget"])
    for population in ("a", "b"):
        store.add_population(population, "m2n2", evaluations // 2, {"dim": 4})
    rng = np.random.default_rng(0)
    start = time.time()
    for i in range(evaluations):
        population = "ab"[i % 2]
        candidate = Candidate(f"{population}:{i}", population, rng.uniform(size=4))
        store.add_candidate(candidate, asked_after=i)
        if i % 10 == 9:
            ev = Evaluation(candidate.id, Status.FAILED, -math.inf, None, {}, "w0", start + i, 0.5, f"RuntimeError: {i}", population)
        else:
            scores = (rng.random(examples) < 0.4 + 0.4 * i / evaluations).astype(float)
            ev = Evaluation(candidate.id, Status.OK, float(scores.mean()), scores, {"examples_scored": examples}, "w0", start + i, 0.5, None, population)
        store.add_evaluation(ev)
    store.set_state("finished", {"stop_reason": "budget exhausted"})
    store.close()
    return run_dir


def timed(fn) -> tuple[float, object]:
    began = time.perf_counter()
    value = fn()
    return time.perf_counter() - began, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluations", type=int, default=20_000)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import evomerge
    from evomerge.analysis import archive_history
    from evomerge.report import build_report
    from evomerge.strategies.m2n2 import M2N2

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = write_run(Path(tmp), args.evaluations, args.examples)

        def read_all() -> int:
            store = RunStore(run_dir, readonly=True)
            try:
                return sum(1 for _ in store.evaluations(with_scores=True))
            finally:
                store.close()

        floor, _ = timed(read_all)
        status_s, _ = timed(lambda: subprocess.run([sys.executable, "-m", "evomerge", "status", str(run_dir)], check=True, capture_output=True))
        load_s, frame = timed(lambda: evomerge.load_run(run_dir))
        scores_s, _ = timed(lambda: evomerge.load_run(run_dir, per_example=True))
        history_s, history = timed(lambda: archive_history(run_dir))
        kept = M2N2.archive_stats
        M2N2.archive_stats = M2N2._measure_archive  # after every evaluation, as before the cache
        try:
            every_s, every = timed(lambda: archive_history(run_dir))
        finally:
            M2N2.archive_stats = kept
        assert every.equals(history), "the kept statistics differ from measuring after every evaluation"
        report_s, page = timed(lambda: build_report(run_dir, Path(tmp) / "report.html"))
        plots = sum(p.stat().st_size for p in (Path(tmp) / "report-plots").glob("*.png"))
        figures = {
            "evaluations": len(frame),
            "examples": args.examples,
            "store_mb": round((run_dir / "run.db").stat().st_size / 2**20, 1),
            "floor_read_all_seconds": round(floor, 3),
            "status_cli_seconds": round(status_s, 3),
            "load_run_seconds": round(load_s, 3),
            "load_run_per_example_seconds": round(scores_s, 3),
            "archive_history_seconds": round(history_s, 3),
            "archive_history_stats_every_evaluation_seconds": round(every_s, 3),
            "report_seconds": round(report_s, 3),
            "report_html_mb": round(Path(page).stat().st_size / 2**20, 3),
            "report_plots_mb": round(plots / 2**20, 3),
            "load_run_x_floor": round(load_s / floor, 2),
            "archive_history_x_floor": round(history_s / floor, 2),
            "report_x_floor": round(report_s / floor, 2),
        }
    print(json.dumps(figures, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
