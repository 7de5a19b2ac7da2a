"""Which merge method? Every registered operator and strategy on the same experts.

Two settings, each with its experts trained here from one initialisation:

* ``digits``: three MLPs (64-64-10, the demo's model) trained as the demo trains its two, on digits
  0–3, 4–6 and 7–9 of sklearn's training split; fitness = training-split accuracy, held out = the
  test split, all ten digits;
* ``tiny_lm``: the LM demo's tiny Llama base and its addition and string-reversal specialists
  (``evomerge.demo_lm``); fitness = exact match on the demo's 60 mixed fitness rows, held out = its
  200 mixed test rows.

In each setting:

* every registered operator that applies is merged once at its declared defaults (``evals`` 0;
  ``seconds`` is the time to produce the merge, including Fisher merging's per-expert Fisher
  estimate on 64 rows of each expert's own task) — ``lora_compose`` merges LoRA adapters and
  ``slerp`` / ``split_slerp`` take exactly two experts, so they are left out where they cannot run;
* every registered strategy searches one space — layer-wise task arithmetic, one weight per expert
  per layer group (λ = 1, start 0.3, AdaMerging's prior) — for ``--budget`` evaluations
  (``evo_merging`` needs ``lora_compose``); MAP and NSGA-II search the per-task scores as
  objectives (``fitness.tasks``), AdaMerging the prediction entropy; each reports the held-out score
  of its candidate with the best fitness (``seconds``: the whole search, scoring included);
* ``<setting>_searched``: CMA-ES searches each operator's own parameters (every parameter it
  declares, within its declared bounds, per layer group; layer swapping's expert is a categorical
  gene) for the same budget, from the declared defaults.

With several ``--seeds`` the searches' figures are means over those seeds (the experts stay those
of ``--expert-seed``). Prints ``{"digits": {"METHOD": {"test_acc", "evals", "seconds"}, …}, …}`` and
writes the same as a Markdown table into ``benchmarks/README.md`` (between the ``compare_methods``
markers).

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

from evomerge.plan import RunPlan
from evomerge.records import Candidate, Evaluation
from evomerge.config import RunConfig, config_from_dict
from evomerge.fitness.data import load_examples
from evomerge.merge import MERGE_METHODS
from evomerge.models.zoo.digits_mlp import DigitsMLP, DigitsMLPConfig, register
from evomerge.models.loading import quiet_transformers
from evomerge.space.merge_space import Space
from evomerge.strategies import STRATEGIES, make_strategy

DIGIT_TASKS = {"digits_0_3": [0, 1, 2, 3], "digits_4_6": [4, 5, 6], "digits_7_9": [7, 8, 9]}
HIDDEN = 64
TRAIN_STEPS = 100  # as evomerge.demo trains its experts
LEARNING_RATE = 3e-3
FISHER_ROWS = 64
ADAPTERS_ONLY = {"lora_compose", "evo_merging"}  # operator and strategy for LoRA adapters
README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- compare_methods:begin -->", "<!-- compare_methods:end -->"
SEARCH_SPACE = {"method": "task_arithmetic", "granularity": "per_layer_group", "search": ["weight"],
                "fixed": {"lambda": 1.0}, "init": {"weight": 0.3}}


def strategy_populations() -> list[dict[str, str]]:
    return [{"name": s, "strategy": s} for s in sorted(STRATEGIES) if s not in ADAPTERS_ONLY]


# --- the settings --------------------------------------------------------------------------------


def digits_setting(root: Path, seed: int) -> RunConfig:
    """Base and three digit experts (Adam, full batch), and the config that merges them."""
    register()
    quiet_transformers()
    torch.manual_seed(seed)
    base = DigitsMLP(DigitsMLPConfig(hidden_sizes=[HIDDEN]))
    base.save_pretrained(root / "base")
    train = load_examples("sklearn:digits", "train")
    for i, (name, classes) in enumerate(DIGIT_TASKS.items()):
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
    tasks = {name: {"source": "sklearn:digits", "split": "train", "classes": c} for name, c in DIGIT_TASKS.items()}
    return config_from_dict({
        "seed": seed,
        "executor": "inline",
        "models": {
            "base": str(root / "base"),
            "experts": [{"path": str(root / n), "name": n, "data": {**d, "limit": FISHER_ROWS}} for n, d in tasks.items()],
            "device": "cpu",
        },
        "merge": SEARCH_SPACE,
        "populations": strategy_populations(),
        "fitness": {
            "name": "classification_accuracy",
            "data": {"source": "sklearn:digits", "split": "train"},
            "test_data": {"source": "sklearn:digits", "split": "test"},
            "tasks": tasks,
        },
        "budget": {"evaluations": 1},
    })


def tiny_lm_setting(root: Path, seed: int) -> RunConfig:
    """The LM demo's base and specialists, with per-skill fitness rows and Fisher data."""
    from evomerge import demo_lm
    from evomerge.models.zoo.tiny_lm import skill_examples

    data = root / "data"
    fitness = {"name": "exact_match", "options": {"batch_size": 64, "max_new_tokens": 8, "answer_regex": r"^\s*(\S+)"},
               "data": {"source": str(data / "fitness.jsonl")}, "test_data": {"source": str(data / "test.jsonl")}}
    config = lambda experts, tasks: config_from_dict({  # noqa: E731
        "seed": seed,
        "executor": "inline",
        "models": {"base": str(root / "base"), "experts": experts, "device": "cpu"},
        "merge": SEARCH_SPACE,
        "populations": strategy_populations(),
        "fitness": {**fitness, "tasks": tasks},
        "budget": {"evaluations": 1},
    })
    plain = [{"path": str(root / s), "name": s} for s in demo_lm.SKILLS]
    demo_lm.prepare(config(plain, {}))
    rows = [json.loads(line) for line in (data / "fitness.jsonl").read_text().splitlines()]
    experts, tasks = [], {}
    for i, skill in enumerate(demo_lm.SKILLS):
        own = data / f"fisher-{skill}.jsonl"  # rows of the expert's skill it was not scored on
        own.write_text("".join(json.dumps(r) + "\n" for r in skill_examples(skill, FISHER_ROWS, seed + 3000 + i)))
        scored = data / f"fitness-{skill}.jsonl"
        scored.write_text("".join(json.dumps(r) + "\n" for r in rows if r["skill"] == skill))
        experts.append({"path": str(root / skill), "name": skill, "data": {"source": str(own)}})
        tasks[skill] = {"source": str(scored)}
    return config(experts, tasks)


# --- the measurements ----------------------------------------------------------------------------


def applicable(method_name: str, n_experts: int) -> bool:
    method = MERGE_METHODS[method_name]
    fits = method.min_models <= n_experts <= (method.max_models or n_experts)
    return fits and method_name not in ADAPTERS_ONLY


def expert_rows(worker: Any) -> dict[str, dict[str, float]]:
    labels = worker.config.models.expert_labels()
    linear = Space.build(MERGE_METHODS["linear"], worker.models.tensor_names, len(labels), "per_model")
    rows = {}
    for i, label in enumerate(labels):
        worker.models.materializer.apply(linear.decode(linear.encode({"weight": np.eye(len(labels))[i]})))
        rows[f"expert {label}"] = {"test_acc": worker.score_on(worker.config.fitness.test_data).fitness, "evals": 0, "seconds": 0.0}
    return rows


def operator_rows(worker: Any) -> dict[str, dict[str, float]]:
    """Each applicable operator at its declared defaults, merged once (Fishers stay set after)."""
    from evomerge.merge.fisher import FISHER_FLOOR
    from evomerge.workers.fisher_estimate import expert_fishers

    rows = {}
    names = worker.models.tensor_names
    n = len(worker.config.models.experts)
    for name, method in MERGE_METHODS.items():
        if not applicable(name, n):
            continue
        started = time.perf_counter()
        if method.needs_fisher:
            worker.models.materializer.set_fishers(expert_fishers(worker.config, worker.device, names), FISHER_FLOOR)
        space = Space.build(method, names, n, granularity="global" if method.global_only else "per_model")
        worker.models.materializer.apply(space.decode(space.x0()))
        seconds = time.perf_counter() - started
        rows[name] = {"test_acc": worker.score_on(worker.config.fitness.test_data).fitness, "evals": 0, "seconds": seconds}
    return rows


def search(worker: Any, strategy_name: str, seed: int, budget: int) -> dict[str, float]:
    """One strategy on the run's space for ``budget`` evaluations, sequentially."""
    options: dict[str, Any] = {}
    if strategy_name in ("map", "nsga2"):
        options["objectives"] = list(worker.config.fitness.tasks)
    if strategy_name == "nsga2":
        options["population_size"] = 10
    strategy = make_strategy(strategy_name, strategy_name, worker.space.search_spec(), seed, options)

    def evaluate(cand):
        return worker.evaluate(cand)

    return _drive(strategy, evaluate, budget, lambda genome: worker.score_on(worker.config.fitness.test_data, Candidate("best", strategy_name, genome)).fitness)


def searched_operator(worker: Any, name: str, seed: int, budget: int) -> dict[str, float]:
    """CMA-ES over one operator's own parameters, per layer group, for ``budget`` evaluations."""
    method = MERGE_METHODS[name]
    n = len(worker.config.models.experts)
    granularity = "global" if method.global_only else "per_layer_group"
    space = Space.build(method, worker.models.tensor_names, n, granularity=granularity)
    strategy = make_strategy("cmaes", "cmaes", space.search_spec(), seed, {})
    materializer = worker.models.materializer

    def evaluate(cand):
        materializer.apply(space.decode(cand.genome))
        return Evaluation(cand.id, "ok", float(np.mean(worker.score(worker.examples))))

    def held_out(genome):
        materializer.apply(space.decode(genome))
        return worker.score_on(worker.config.fitness.test_data).fitness

    return _drive(strategy, evaluate, budget, held_out)


def _drive(strategy: Any, evaluate: Any, budget: int, held_out: Any) -> dict[str, float]:
    """Ask/tell one at a time until ``budget`` evaluations or the strategy stops; score its best."""
    started = time.perf_counter()
    evals = 0
    while evals < budget:
        batch = strategy.ask(1)
        if not batch:
            break  # stopped (e.g. CMA-ES on a flat fitness over a few categorical genes)
        strategy.tell([evaluate(batch[0])])
        evals += 1
    seconds = time.perf_counter() - started
    best = strategy.best()
    return {"test_acc": held_out(best[1]) if best else float("nan"), "evals": evals, "seconds": seconds}


def mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in runs])) for key in ("test_acc", "evals", "seconds")}


def compare(config: RunConfig, seeds: list[int], budget: int) -> tuple[dict, dict]:
    """(experts, operators at defaults and strategies), (operators searched by CMA-ES)."""
    from evomerge.workers.whitebox import WhiteBoxWorker

    worker = WhiteBoxWorker(RunPlan.from_config(config), worker_id="compare")
    rows = {**expert_rows(worker), **operator_rows(worker)}
    for population in config.populations:
        rows[population.strategy] = mean([search(worker, population.strategy, s, budget) for s in seeds])
    n = len(config.models.experts)
    searched = {
        name: mean([searched_operator(worker, name, s, budget) for s in seeds])
        for name in MERGE_METHODS
        if applicable(name, n)
    }
    return rows, searched


# --- output --------------------------------------------------------------------------------------


def markdown(results: dict[str, dict[str, dict[str, float]]], budget: int, seeds: list[int]) -> str:
    lines = [
        f"`<setting>`: operators merged once at their defaults, strategies searching layer-wise task"
        f" arithmetic for {budget} evaluations; `<setting>_searched`: CMA-ES searching each operator's"
        f" own parameters per layer group for {budget} evaluations. Searches: mean over seeds"
        f" {', '.join(map(str, seeds))}. Held-out score: test accuracy (digits) or exact match (tiny_lm).",
        "",
        "| setting | method | kind | held-out score | evaluations | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for setting, rows in results.items():
        for method, row in sorted(rows.items(), key=lambda kv: -kv[1]["test_acc"]):
            if method.startswith("expert "):
                kind = "expert"
            elif setting.endswith("_searched"):
                kind = "operator, searched by CMA-ES"
            else:
                kind = "strategy" if method in STRATEGIES else "operator at defaults"
            lines.append(
                f"| {setting} | `{method}` | {kind} | {row['test_acc']:.4f} | {row['evals']:g} | {row['seconds']:.2f} |"
            )
    return "\n".join(lines)


def write_readme(table: str) -> None:
    text = README.read_text()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## compare_methods.py\n\n{block}\n"
    README.write_text(text)


SETTINGS = {"digits": digits_setting, "tiny_lm": tiny_lm_setting}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=60, help="evaluations per search")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="search seeds (results are means)")
    parser.add_argument("--expert-seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results: dict[str, dict[str, dict[str, float]]] = {}
    for setting in args.settings:
        with tempfile.TemporaryDirectory() as tmp:
            config = SETTINGS[setting](Path(tmp), args.expert_seed)
            results[setting], results[f"{setting}_searched"] = compare(config, args.seeds, args.budget)
    write_readme(markdown(results, args.budget, args.seeds))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(markdown(results, args.budget, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
