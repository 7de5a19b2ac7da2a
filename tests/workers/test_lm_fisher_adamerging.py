"""Fisher merging and AdaMerging on causal LMs: a tiny Llama with text data, built here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from evomerge.plan import RunPlan
from evomerge.records import Candidate


SKILLS = ("addition", "reversal")


@pytest.fixture(scope="module")
def tiny_lm_run(tmp_path_factory):
    """A base, two experts (the base nudged differently) and one data file per skill."""
    from evomerge.models.zoo.tiny_lm import build_tokenizer, skill_examples, tiny_llama

    root = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = build_tokenizer()
    base = tiny_llama(tokenizer, hidden=32, seed=0)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    for i, skill in enumerate(SKILLS):
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.02 * torch.randn_like(p))
        paths[skill] = root / skill
        base.save_pretrained(paths[skill])
        tokenizer.save_pretrained(paths[skill])
        with (root / f"{skill}.jsonl").open("w") as f:
            for row in skill_examples(skill, 6, seed=i):
                f.write(json.dumps(row) + "\n")
    return root


def _config(root, strategy: str, **merge):
    from evomerge.config import config_from_dict

    experts = [{"path": str(root / s), "data": {"source": str(root / f"{s}.jsonl")}} for s in SKILLS]
    return config_from_dict({
        "executor": "inline",
        "score_experts": False,
        "models": {"base": str(root / "base"), "experts": experts, "device": "cpu"},
        "merge": merge,
        "populations": [{"name": "pop", "strategy": strategy}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "addition.jsonl")}},
        "budget": {"evaluations": 2},
    })


def test_text_fisher_is_the_mean_squared_gradient_of_each_target(tiny_lm_run):
    from evomerge.fitness.data import load_examples
    from evomerge.models.loading import load_model, load_tokenizer
    from evomerge.workers.fisher_estimate import diagonal_fisher

    ref = str(tiny_lm_run / "addition")
    model, tokenizer = load_model(ref, torch.device("cpu"), torch.float32), load_tokenizer(ref)
    rows = load_examples(str(tiny_lm_run / "addition.jsonl"), None, None, 3, tiny_lm_run)
    estimate = diagonal_fisher(model, rows, tokenizer)
    model.requires_grad_(True)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in rows:  # the target's tokens follow the prompt's; CE summed over the target only
        prompt = tokenizer(row["prompt"])["input_ids"]
        whole = tokenizer(row["prompt"] + row["target"])["input_ids"]
        logits = model(input_ids=torch.tensor([whole])).logits[0, len(prompt) - 1 : len(whole) - 1]
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits, torch.tensor(whole[len(prompt):]), reduction="sum").backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square() / len(rows)
    for name in expected:
        torch.testing.assert_close(estimate[name], expected[name], rtol=1e-4, atol=1e-9)


def test_a_worker_merges_lms_by_fisher(tiny_lm_run):
    from evomerge.workers.whitebox import WhiteBoxWorker

    worker = WhiteBoxWorker(RunPlan.from_config(_config(tiny_lm_run, "cmaes", method="fisher")))
    evaluation = worker.evaluate(Candidate("pop:0", "pop", worker.space.x0()))
    assert evaluation.status == "ok" and np.isfinite(evaluation.fitness)
    assert worker.models.materializer.fishers is not None


def test_lm_entropy_gradient_matches_finite_differences(tiny_lm_run):
    from evomerge.workers.whitebox import WhiteBoxWorker

    worker = WhiteBoxWorker(RunPlan.from_config(_config(tiny_lm_run, "adamerging", method="task_arithmetic", granularity="per_model", search=["weight"])))
    evaluation = worker.evaluate(Candidate("pop:0", "pop", np.full(2, 0.3)))
    assert evaluation.status == "ok"
    gradient = np.array(evaluation.metrics["loss_gradient"])
    entropy = worker.extra_metrics.gradient.entropy
    for i in range(2):
        step = np.zeros(2)
        step[i] = 1e-3
        numeric = (float(entropy(torch.tensor(0.3 + step))) - float(entropy(torch.tensor(0.3 - step)))) / 2e-3
        assert gradient[i] == pytest.approx(numeric, rel=2e-2, abs=1e-5)
