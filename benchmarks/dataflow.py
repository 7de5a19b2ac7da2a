"""PS, DFS and PS+DFS on the tiny-LM demo's specialists (Akiba et al., arXiv:2403.13187, Table 1's
ordering: PS+DFS ≥ PS > DFS alone).

Usage::

    python benchmarks/dataflow.py --json [--evaluations 100] [--seeds 0 1 2] [--models DIR] [--threads 1]

The models are the LM demo's (``evomerge/demos/lm.yaml``: a tiny Llama base of 2 layers, hidden
128, and an addition and a reversal specialist fine-tuned from it), trained here once into
``--models`` (kept, so a second run skips the training). Per seed, three searches of the same
``--evaluations`` each, with the demo's populations (CMA-ES and M2N2), exact match on the demo's
60 fitness prompts, inline executor:

* ``ps``: the demo's own parameter-space search (task arithmetic, one weight per expert per layer group);
* ``dfs``: the data-flow space over the two specialists' layers (repeats 3, a scale per slot,
  paths of at most 8 layers);
* ``ps_dfs``: the same data-flow space with that seed's PS best as the first source (``run:``),
  so it sees the PS budget and then its own.

Every score is held-out exact match on the demo's 200 test prompts (the best candidate of the
search by fitness, rescored); ``specialists`` scores each specialist alone. Scores are means over
the seeds; ``per_seed`` lists them. ``switch_seconds`` is the mean time a data-flow worker spends
pointing the working model at a candidate's path (the recorded ``merge_seconds`` of the DFS and
PS+DFS evaluations); ``merge_seconds`` the same for the PS runs' weight merges of the same model.
Threads: ``--threads`` (default 1) as a Ray worker with one CPU runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.config import RunConfig, config_from_dict
from evomerge.demo_lm import prepare
from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.runs import start_run
from evomerge.store import RunStore
from evomerge.workers.whitebox import WhiteBoxWorker

SPECIALISTS = ("addition", "reversal")
DATAFLOW = {"space": "dataflow", "dataflow": {"repeats": 3, "scaling": "per_slot", "max_layers": 8}}


def demo_config(models: Path) -> dict[str, Any]:
    """The LM demo's config with its model and data paths under ``models``."""
    data = yaml.safe_load(resources.files("evomerge.demos").joinpath("lm.yaml").read_text())
    data["models"]["base"] = str(models / "base")
    for expert in data["models"]["experts"]:
        expert["path"] = str(models / expert["name"])
    data["fitness"]["data"]["source"] = str(models / "data" / "fitness.jsonl")
    data["fitness"]["test_data"]["source"] = str(models / "data" / "test.jsonl")
    return data


def configured(base: dict[str, Any], run_dir: Path, seed: int, evaluations: int, **changes: Any) -> RunConfig:
    data = copy.deepcopy(base)
    data.update(run_dir=str(run_dir), seed=seed, executor="inline", checkpoint_every=1000, **changes)
    data["models"]["device"] = "cpu"
    data["budget"] = {"evaluations": evaluations}
    data.pop("workers", None)
    return config_from_dict(data, str(run_dir), run_dir.parent)


def dataflow_config(base: dict[str, Any], sources: list[dict[str, str]], run_dir: Path, seed: int, evaluations: int) -> RunConfig:
    models = {**base["models"], "experts": sources}
    models.pop("base")
    return configured(base, run_dir, seed, evaluations, models=models, merge=DATAFLOW)


def search(config: RunConfig) -> dict[str, Any]:
    """Run the search; its best rescored on the test prompts, and its mean materialization time."""
    start_run(config, config.run_dir)
    store = RunStore(Path(config.run_dir), readonly=True)
    try:
        best = store.best()
        seconds = [e.metrics["merge_seconds"] for e in store.evaluations() if "merge_seconds" in e.metrics]
    finally:
        store.close()
    worker = WhiteBoxWorker(RunPlan.from_config(config), worker_id="held-out")
    try:
        held_out = worker.score_on(config.fitness.test_data, Candidate(best.candidate_id, best.population, best.genome))
    finally:
        worker.close()
    return {"held_out": held_out.fitness, "fitness": best.fitness, "materialize_seconds": statistics.fmean(seconds)}


def specialist_score(base: dict[str, Any], name: str, models: Path, root: Path) -> float:
    """A specialist alone on the test prompts: a data-flow worker over it only holds it unchanged."""
    config = dataflow_config(base, [{"path": str(models / name), "name": name}], root / f"alone-{name}", 0, 2)
    worker = WhiteBoxWorker(RunPlan.from_config(config), worker_id="held-out")
    try:
        return worker.score_on(config.fitness.test_data).fitness
    finally:
        worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--evaluations", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-dataflow-bench-models")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    models = args.models.resolve()
    base = demo_config(models)
    prepare(config_from_dict(copy.deepcopy(base), "demo", models))
    specialists = [{"path": str(models / name), "name": name} for name in SPECIALISTS]
    per_seed: dict[str, list[dict[str, Any]]] = {"ps": [], "dfs": [], "ps_dfs": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scores = {name: specialist_score(base, name, models, root) for name in SPECIALISTS}
        for seed in args.seeds:
            ps_dir = root / f"ps-{seed}"
            per_seed["ps"].append(search(configured(base, ps_dir, seed, args.evaluations)))
            per_seed["dfs"].append(search(dataflow_config(base, specialists, root / f"dfs-{seed}", seed, args.evaluations)))
            sources = [{"run": str(ps_dir), "name": "ps-best"}, *specialists]
            per_seed["ps_dfs"].append(search(dataflow_config(base, sources, root / f"ps-dfs-{seed}", seed, args.evaluations)))
    mean = lambda space, key: statistics.fmean(r[key] for r in per_seed[space])  # noqa: E731
    result = {
        "specialists": scores,
        "ps": mean("ps", "held_out"),
        "dfs": mean("dfs", "held_out"),
        "ps_dfs": mean("ps_dfs", "held_out"),
        "switch_seconds": statistics.fmean([*(r["materialize_seconds"] for r in per_seed["dfs"]), *(r["materialize_seconds"] for r in per_seed["ps_dfs"])]),
        "merge_seconds": mean("ps", "materialize_seconds"),
        "seeds": args.seeds,
        "evaluations_per_search": args.evaluations,
        "per_seed": per_seed,
        "threads": args.threads,
        "wall_seconds": time.perf_counter() - t0,
        "loadavg": {"before": load_before, "after": os.getloadavg()},
    }
    json.dump(result, sys.stdout, indent=None if args.json else 2)
    print()


if __name__ == "__main__":
    main()
