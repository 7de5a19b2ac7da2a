"""Racing's figure: fitness examples scored to reach full scoring's held-out quality.

For each task (the digits demo, the tiny-LM demo) and seed, the same search (CMA-ES and M2N2, the
demo configs' populations) runs twice with the same number of candidates (the demo config's
budget unless ``--candidates``): once scoring every candidate on every fitness example, once with
``fitness.racing``. Along each run, the held-out
score (the test split the search never sees) of its best fully scored candidate so far is
measured. ``held_out_full`` is what full scoring's best reaches with all its candidates, at the
cost of ``full_examples``; ``racing_examples`` are the examples the racing run's workers had
scored (``examples_scored``: stopped candidates and screening stages included) when its held-out
best first came within ``--tolerance`` (1 point) of that. ``savings`` = full / racing, summed
over seeds; a racing run that never gets within the tolerance counts all its examples and is
listed in ``not_reached``. ``savings_same_candidates`` compares the two whole runs (every
candidate), with ``held_out_racing`` the racing run's final held-out score. MERGE³ (arXiv
2502.10436) reports 50× less fitness computation; the target here is 5×.

The demos' models are trained first (the tiny LM's in about a minute on an idle 2-core box, 12 on
a loaded one) and are the same for every seed and setting: ``--models DIR`` keeps them and the
data files there and reuses them.

    python benchmarks/racing.py --json                # both tasks, seeds 0 1 2
    python benchmarks/racing.py --tasks digits --candidates 200 --no-paired --json
    python benchmarks/racing.py --tasks tiny_lm --lm-rows 160 --models ~/.cache/racing-bench --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import yaml  # noqa: E402

from evomerge.config import RacingConfig, config_from_dict  # noqa: E402
from evomerge.fitness.racing import count  # noqa: E402
from evomerge.plan import RunPlan  # noqa: E402
from evomerge.records import Candidate  # noqa: E402
from evomerge.runs import start_run  # noqa: E402
from evomerge.store import RunStore  # noqa: E402
from evomerge.workers.whitebox import WhiteBoxWorker  # noqa: E402

DEMOS = Path(__file__).resolve().parents[1] / "evomerge" / "demos"
LM_FITNESS_ROWS = 1000
"""The demo's 60 are too few to screen on; same generator, as many rows as an LM benchmark task
(GSM8K's test split has 1319, ARC-Challenge's 1172, MGSM 250 per language)."""
LM_TEST_ROWS = 2000
"""The demo's 200 held-out rows measure exact match to ±2.7 points (one standard error at 0.83),
too coarse for a 1-point tolerance; 2000 distinct rows none of which is a fitness row: ±0.85."""


def digits_setup(root: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    from evomerge.demo import prepare_digit_experts

    models = root / "digits-models"
    paths = [models / "base", models / "digits-0-4", models / "digits-5-9"]
    prepare_digit_experts(paths[0], paths[1:], seed=0)
    data = yaml.safe_load((DEMOS / "digits.yaml").read_text())
    data["models"]["base"] = str(paths[0])
    data["models"]["experts"] = [{"path": str(p), "name": p.name} for p in paths[1:]]
    return models, data


def tiny_lm_setup(root: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    from evomerge import demo_lm
    from evomerge.models.zoo.tiny_lm import skill_examples

    data = yaml.safe_load((DEMOS / "lm.yaml").read_text())
    models = root / "lm-models"
    data["models"]["base"] = str(models / "base")
    for expert in data["models"]["experts"]:
        expert["path"] = str(models / expert["name"])
    data["fitness"]["data"] = {"source": str(models / "data" / "fitness.jsonl")}  # the demo's 60 rows
    data["fitness"]["test_data"] = {"source": str(models / "data" / "test.jsonl")}
    demo_lm.prepare(config_from_dict({**data, "budget": {"evaluations": 1}}, "lm", root))  # kept if present
    fitness = models / "data" / f"fitness-{args.lm_rows}.jsonl"
    rows = [r for s in demo_lm.SKILLS for r in skill_examples(s, args.lm_rows // 2, 1000)]
    demo_lm._write_jsonl(fitness, rows)
    data["fitness"]["data"] = {"source": str(fitness)}
    test = models / "data" / f"test-{args.lm_test_rows}.jsonl"
    seen = {r["prompt"] for r in rows}
    held_out = []
    for skill in demo_lm.SKILLS:  # the demo's test seed, fitness prompts and repeats left out
        fresh = [r for r in skill_examples(skill, 4 * args.lm_test_rows, 2000) if not (r["prompt"] in seen or seen.add(r["prompt"]))]
        held_out += fresh[: args.lm_test_rows // 2]
    demo_lm._write_jsonl(test, held_out)
    data["fitness"]["test_data"] = {"source": str(test)}
    return models, data


SETUPS = {"digits": digits_setup, "tiny_lm": tiny_lm_setup}


def search(base: dict[str, Any], racing: dict[str, Any] | None, seed: int, candidates: int, run_dir: Path) -> Path:
    data = json.loads(json.dumps(base))
    data.update(seed=seed, executor="inline", score_experts=False, checkpoint_every=50, run_dir=str(run_dir))
    data["budget"] = {"evaluations": candidates}
    data.pop("workers", None)
    data["models"]["device"] = "cpu"
    if racing is not None:
        data["fitness"]["racing"] = racing
    start_run(config_from_dict(data, "racing-benchmark"), "racing-benchmark", run_dir)
    return run_dir


def held_out_curve(run_dir: Path, worker: WhiteBoxWorker, test_data) -> list[tuple[int, float, float]]:
    """(examples scored so far, held-out score and fitness of the best fully scored candidate so
    far) after each evaluation that brought a new best."""
    store = RunStore(run_dir, readonly=True)
    try:
        curve, used, best = [], 0, None
        for ev in store.evaluations():
            used += int(ev.metrics.get("examples_scored", 0))
            if ev.fully_scored and (best is None or ev.fitness > best):
                best = ev.fitness
                held_out = worker.score_on(test_data, Candidate(ev.candidate_id, ev.population, ev.genome)).fitness
                curve.append((used, held_out, best))
        return curve + [(used, *curve[-1][1:])]
    finally:
        store.close()


def examples_to_reach(curve: list[tuple[int, float, float]], target: float, tolerance: float) -> int | None:
    return next((used for used, held_out, _ in curve if held_out >= target - tolerance), None)


def run_task(task: str, args: argparse.Namespace, root: Path, models: Path) -> dict[str, Any]:
    _, base = SETUPS[task](models / task, args)
    candidates = args.candidates or base["budget"]["evaluations"]
    racing = {"stages": args.stages, "z": args.z, "top_k": args.top_k, "paired": args.paired, "seed": 0}
    totals = {"full": 0, "racing": 0, "racing_all": 0}
    per_seed, not_reached = [], []
    held = {"full": [], "racing": []}
    started = time.perf_counter()
    for seed in args.seeds:
        curves = {}
        for kind, block in (("full", None), ("racing", racing)):
            run_dir = search(base, block, seed, candidates, root / task / f"{kind}-{seed}")
            plan = RunPlan.from_config(config_from_dict({**base, "run_dir": str(run_dir), "fitness": base["fitness"]}, task))
            worker = WhiteBoxWorker(plan, worker_id="held-out")
            n_examples = count(worker.examples)
            try:
                curves[kind] = held_out_curve(run_dir, worker, plan.config.fitness.test_data)
            finally:
                worker.close()
        target = curves["full"][-1][1]
        reached = {"full": curves["full"][-1][0], "racing": examples_to_reach(curves["racing"], target, args.tolerance)}
        if reached["racing"] is None:
            not_reached.append(seed)
            reached["racing"] = curves["racing"][-1][0]
        for kind, curve in curves.items():
            totals[kind] += reached[kind]
            held[kind].append(curve[-1][1])
        totals["racing_all"] += curves["racing"][-1][0]
        per_seed.append({
            "seed": seed, "full_examples": reached["full"], "racing_examples": reached["racing"],
            "held_out_full": round(curves["full"][-1][1], 4), "held_out_racing": round(curves["racing"][-1][1], 4),
            "racing_all_examples": curves["racing"][-1][0],
            "fitness_full": round(curves["full"][-1][2], 4), "fitness_racing": round(curves["racing"][-1][2], 4),
        })
    return {
        "full_examples": totals["full"],
        "racing_examples": totals["racing"],
        "savings": round(totals["full"] / max(1, totals["racing"]), 2),
        "savings_same_candidates": round(totals["full"] / max(1, totals["racing_all"]), 2),
        "held_out_full": round(sum(held["full"]) / len(held["full"]), 4),
        "held_out_racing": round(sum(held["racing"]) / len(held["racing"]), 4),
        "candidates": candidates,
        "fitness_examples": n_examples,
        "racing": racing,
        "tolerance": args.tolerance,
        "not_reached": not_reached,
        "seeds": per_seed,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(SETUPS), default=["tiny_lm", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--candidates", type=int, help="per search (default: the demo config's budget, 200 tiny LM, 480 digits)")
    defaults = RacingConfig()  # fitness.racing's defaults unless told otherwise
    parser.add_argument("--stages", nargs="+", type=float, default=defaults.stages)
    parser.add_argument("--z", type=float, default=defaults.z)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=defaults.paired,
                        help="the paired rule (--no-paired: the unpaired one)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="1 point of accuracy / exact match")
    parser.add_argument("--lm-rows", type=int, default=LM_FITNESS_ROWS, help="tiny-LM fitness examples")
    parser.add_argument("--lm-test-rows", type=int, default=LM_TEST_ROWS, help="tiny-LM held-out examples")
    parser.add_argument("--models", type=Path, help="keep the demos' trained models here and reuse them (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="racing-bench-") as tmp:
        models = args.models.expanduser().resolve() if args.models else Path(tmp)
        result: dict[str, Any] = {task: run_task(task, args, Path(tmp), models) for task in args.tasks}
    result["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
