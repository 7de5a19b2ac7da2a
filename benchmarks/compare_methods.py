"""Which merge method? Every registered operator and strategy on the same three digit experts.

Three MLPs (64-64-10, the demo's model) start from one initialisation and are trained, as the demo
trains its two, on digits 0–3, 4–6 and 7–9 of sklearn's training split. Then:

* every registered operator that applies to three full experts is merged once at its declared
  defaults (no search: ``evals`` is 0; ``seconds`` is the time to produce the merge, including
  Fisher merging's per-expert Fisher estimate) — ``slerp`` / ``split_slerp`` take two experts and
  ``lora_compose`` LoRA adapters, so they are left out;
* every registered strategy searches one space — layer-wise task arithmetic, one weight per expert
  per layer (6 genes, λ = 1, start 0.3 as AdaMerging's prior) — for ``--budget`` evaluations of
  training-split accuracy (``evo_merging`` needs ``lora_compose`` and is left out); MAP and NSGA-II
  search the three per-task accuracies as objectives, AdaMerging the prediction entropy; each
  reports the test accuracy of its candidate with the best training accuracy (``seconds``: the
  whole search, scoring included).

A second setting, ``digits_searched``, asks which operator gains most from a search: CMA-ES (the
default strategy) searches each operator's parameters per layer group (every parameter the operator
declares, within its declared bounds; layer swapping's expert choice is a categorical gene) for the
same budget, starting from the declared defaults.

Held-out accuracy is on sklearn's test split, all ten digits. With several ``--seeds`` the
searches' figures are means over those seeds (the experts stay those of ``--expert-seed``).
Prints ``{"digits": {"METHOD": {"test_acc", "evals", "seconds"}, …}, "digits_searched": {…}}`` and
writes the same as a Markdown table into ``benchmarks/README.md`` (between the
``compare_methods`` markers).

    python benchmarks/compare_methods.py --json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.config import config_from_dict
from evomerge.fitness.data import load_examples
from evomerge.merge import MERGE_METHODS
from evomerge.models.digits_mlp import DigitsMLP, DigitsMLPConfig, register
from evomerge.models.loading import quiet_transformers
from evomerge.space import Space
from evomerge.strategies import STRATEGIES, make_strategy

TASKS = {"digits_0_3": [0, 1, 2, 3], "digits_4_6": [4, 5, 6], "digits_7_9": [7, 8, 9]}
HIDDEN = 64
TRAIN_STEPS = 100  # as evomerge.demo trains its experts
LEARNING_RATE = 3e-3
NOT_APPLICABLE = {
    "slerp": "two experts only",
    "split_slerp": "two experts only",
    "lora_compose": "LoRA adapters only",
    "evo_merging": "searches lora_compose (LoRA adapters) only",
}
README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- compare_methods:begin -->", "<!-- compare_methods:end -->"


def train_experts(root: Path, seed: int) -> tuple[Path, list[Path]]:
    """Save the shared initialisation and one expert per task (Adam, full batch)."""
    register()
    quiet_transformers()
    torch.manual_seed(seed)
    base = DigitsMLP(DigitsMLPConfig(hidden_sizes=[HIDDEN]))
    base.save_pretrained(root / "base")
    train = load_examples("sklearn:digits", "train")
    paths = []
    for i, (name, classes) in enumerate(TASKS.items()):
        mask = torch.isin(train["labels"], torch.tensor(classes))
        expert = DigitsMLP(base.config)
        expert.load_state_dict(base.state_dict())
        torch.manual_seed(seed + 1 + i)
        optimizer = torch.optim.Adam(expert.parameters(), lr=LEARNING_RATE)
        for _ in range(TRAIN_STEPS):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(expert(train["inputs"][mask]), train["labels"][mask]).backward()
            optimizer.step()
        expert.save_pretrained(root / name)
        paths.append(root / name)
    return root / "base", paths


def run_config(base: Path, experts: list[Path], seed: int) -> Any:
    own_data = [{"source": "sklearn:digits", "split": "train", "classes": c} for c in TASKS.values()]
    searched = sorted(s for s in STRATEGIES if s not in NOT_APPLICABLE)
    return config_from_dict({
        "seed": seed,
        "executor": "inline",
        "models": {
            "base": str(base),
            "experts": [{"path": str(p), "name": n, "data": d} for p, n, d in zip(experts, TASKS, own_data)],
            "device": "cpu",
        },
        "merge": {"method": "task_arithmetic", "granularity": "per_layer_group", "search": ["weight"],
                  "fixed": {"lambda": 1.0}, "init": {"weight": 0.3}},
        "populations": [{"name": s, "strategy": s} for s in searched],
        "fitness": {
            "name": "classification_accuracy",
            "data": {"source": "sklearn:digits", "split": "train"},
            "test_data": {"source": "sklearn:digits", "split": "test"},
            "tasks": {name: {"source": "sklearn:digits", "split": "train", "classes": c} for name, c in TASKS.items()},
        },
        "budget": {"evaluations": 1},
    })


def operator_rows(worker: Any, config: Any) -> dict[str, dict[str, float]]:
    """Each applicable operator at its declared defaults, merged once."""
    from evomerge.merge.fisher import FISHER_FLOOR
    from evomerge.workers.fisher import expert_fishers

    rows = {}
    names = worker.models.tensor_names
    for name, method in MERGE_METHODS.items():
        if name in NOT_APPLICABLE:
            continue
        started = time.perf_counter()
        if method.needs_fisher:
            worker.models.materializer.set_fishers(expert_fishers(config, worker.device, names), FISHER_FLOOR)
        space = Space.build(method, names, len(TASKS), granularity="per_model")
        worker.models.materializer.apply(space.decode(space.x0()))
        seconds = time.perf_counter() - started
        rows[name] = {"test_acc": worker.test_accuracy(), "evals": 0, "seconds": seconds}
    return rows


def expert_rows(worker: Any) -> dict[str, dict[str, float]]:
    linear = Space.build(MERGE_METHODS["linear"], worker.models.tensor_names, len(TASKS), "per_model")
    rows = {}
    for i, name in enumerate(TASKS):
        worker.models.materializer.apply(linear.decode(linear.encode({"weight": np.eye(len(TASKS))[i]})))
        rows[f"expert {name}"] = {"test_acc": worker.test_accuracy(), "evals": 0, "seconds": 0.0}
    return rows


def search(worker: Any, strategy_name: str, seed: int, budget: int) -> dict[str, float]:
    """One strategy for ``budget`` evaluations, sequentially; test accuracy of its best candidate."""
    options: dict[str, Any] = {}
    if strategy_name in ("map", "nsga2"):
        options["objectives"] = list(TASKS)
    if strategy_name == "nsga2":
        options["population_size"] = 10
    strategy = make_strategy(strategy_name, strategy_name, worker.space.search_spec(), seed, options)
    started = time.perf_counter()
    evals = 0
    while evals < budget:
        batch = strategy.ask(1)
        if not batch:
            break  # the strategy stopped
        for cand in batch:
            strategy.tell([worker.evaluate(cand.id, cand.genome, strategy_name)])
            evals += 1
    seconds = time.perf_counter() - started
    best = strategy.best()
    test_acc = worker.test_accuracy(best[1], strategy_name) if best is not None else float("nan")
    return {"test_acc": test_acc, "evals": evals, "seconds": seconds}


def searched_operator(worker: Any, name: str, seed: int, budget: int) -> dict[str, float]:
    """CMA-ES over one operator's own parameters, per layer group, for ``budget`` evaluations."""
    from evomerge.candidates import Evaluation

    space = Space.build(MERGE_METHODS[name], worker.models.tensor_names, len(TASKS), granularity="per_layer_group")
    strategy = make_strategy("cmaes", "cmaes", space.search_spec(), seed, {})
    materializer = worker.models.materializer
    started = time.perf_counter()
    evals = 0
    while evals < budget:
        batch = strategy.ask(1)
        if not batch:
            break  # CMA-ES stopped (e.g. a flat fitness over a few categorical genes)
        materializer.apply(space.decode(batch[0].genome))
        strategy.tell([Evaluation(batch[0].id, "ok", float(np.mean(worker.score(worker.examples))))])
        evals += 1
    seconds = time.perf_counter() - started
    best = strategy.best()
    assert best is not None
    materializer.apply(space.decode(best[1]))
    return {"test_acc": worker.test_accuracy(), "evals": evals, "seconds": seconds}


def markdown(results: dict[str, dict[str, dict[str, float]]], budget: int, seeds: list[int]) -> str:
    lines = [
        f"`digits`: operators merged once at their defaults; strategies searching layer-wise task"
        f" arithmetic for {budget} evaluations. `digits_searched`: CMA-ES searching each operator's own"
        f" parameters per layer group for {budget} evaluations. Searches: mean over seeds"
        f" {', '.join(map(str, seeds))}.",
        "",
        "| setting | method | kind | test accuracy | evaluations | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for setting, rows in results.items():
        ranked = sorted(rows.items(), key=lambda kv: -kv[1]["test_acc"])
        for method, row in ranked:
            if method.startswith("expert "):
                kind = "expert"
            elif setting == "digits_searched":
                kind = "operator, searched by CMA-ES"
            else:
                kind = "strategy" if method in STRATEGIES else "operator at defaults"
            lines.append(
                f"| {setting} | `{method}` | {kind} | {row['test_acc']:.4f} | {row['evals']:g} | {row['seconds']:.2f} |"
            )
    return "\n".join(lines)


def mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in runs])) for key in ("test_acc", "evals", "seconds")}


def write_readme(table: str) -> None:
    text = README.read_text()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## compare_methods.py\n\n{block}\n"
    README.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=60, help="evaluations per strategy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="strategy seeds (results are means)")
    parser.add_argument("--expert-seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from evomerge.workers.local import LocalWorker

    with tempfile.TemporaryDirectory() as tmp:
        base, experts = train_experts(Path(tmp), args.expert_seed)
        worker = LocalWorker(run_config(base, experts, args.seeds[0]), worker_id="compare")
        rows = {**expert_rows(worker), **operator_rows(worker, worker.config)}  # Fishers stay set
        for name in sorted(p.strategy for p in worker.config.populations):
            rows[name] = mean([search(worker, name, seed, args.budget) for seed in args.seeds])
        searched = {
            name: mean([searched_operator(worker, name, seed, args.budget) for seed in args.seeds])
            for name in MERGE_METHODS
            if name not in NOT_APPLICABLE
        }
    results = {"digits": rows, "digits_searched": searched}
    write_readme(markdown(results, args.budget, args.seeds))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(markdown(results, args.budget, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
