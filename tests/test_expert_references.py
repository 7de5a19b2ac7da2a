"""Expert references: every run scores the base and each expert alone once, with a mean per task
(examples that name their task, ``fitness.tasks``), and the report divides the best merge by each
of them per task. Tiny character Llamas, so a whole run takes about a second."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from evomerge.analysis import task_ratios
from evomerge.config import config_from_dict
from evomerge.fitness import FITNESS_FUNCTIONS
from evomerge.fitness.lm import negative_cross_entropy
from evomerge.models.zoo.tiny_lm import skill_examples
from evomerge.plan import RunPlan
from evomerge.runs import start_run
from evomerge.store import RunStore
from evomerge.testing.tiny_models import char_llama
from evomerge.workers.whitebox import WhiteBoxWorker


def target_probability(model, tokenizer, examples):
    """exp(−cross-entropy) of each target: a positive score, so that ratios say better or worse."""
    return negative_cross_entropy(model, tokenizer, examples).exp()


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setitem(FITNESS_FUNCTIONS, "target_probability", target_probability)
    for name, seed in (("base", 0), ("e0", 1), ("e1", 2)):
        model, tokenizer = char_llama(seed)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows = [{**r, "task": "addition"} for r in skill_examples("addition", 3, seed=1)]
    rows += [{**r, "task": "reversal"} for r in skill_examples("reversal", 2, seed=1)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sub.jsonl").write_text("".join(json.dumps(r) + "\n" for r in skill_examples("subtraction", 2, seed=1)))
    return config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "executor": "inline",
            "models": {"base": "base", "experts": ["e0", "e1"], "device": "cpu"},
            "merge": {"method": "task_arithmetic", "granularity": "per_model", "search": ["weight"], "fixed": {"lambda": 1.0}},
            "populations": [{"name": "random", "strategy": "random"}],
            "fitness": {"name": "target_probability", "data": {"source": "train.jsonl"},
                        "tasks": {"subtraction": {"source": "sub.jsonl"}}},
            "budget": {"evaluations": 3},
        },
        "test-config",
        tmp_path,
    )


def test_the_base_alone_is_the_base_model_and_each_model_has_its_task_means(config):
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    base, *experts = worker.expert_baselines()
    reference = char_llama(0)[0].state_dict()
    worker.models.materializer.apply_base()  # after the experts: the base comes back exactly
    for name, param in worker.models.model.named_parameters():
        assert torch.equal(param.data, reference[name]), name
    assert [b.candidate_id for b in (base, *experts)] == ["base", "e0", "e1"]
    assert [b.metrics["baseline"] for b in (base, *experts)] == ["base", "expert", "expert"]
    for b in (base, *experts):
        per_task = b.metrics["per_task"]
        assert per_task["addition"] == pytest.approx(float(b.per_example[:3].mean()))
        assert per_task["reversal"] == pytest.approx(float(b.per_example[3:].mean()))
        assert 0 < b.metrics["subtraction"] < 1  # fitness.tasks: its own data set
    worker.close()


def test_the_report_divides_the_best_merge_by_each_model_per_task(config):
    start_run(config, "test-config")
    store = RunStore(config.run_path(), readonly=True)
    best, baselines = store.best(), store.baselines()
    store.close()
    assert [(b["role"], b["name"]) for b in baselines] == [("base", "base"), ("expert", "e0"), ("expert", "e1")]
    assert set(best.metrics["per_task"]) == {"addition", "reversal"}
    table = task_ratios(config.run_path())
    assert list(table.index) == ["fitness", "addition", "reversal", "subtraction"]
    merged = {"fitness": best.fitness, **best.metrics["per_task"], "subtraction": best.metrics["subtraction"]}
    for b in baselines:
        theirs = {"fitness": b["fitness"], **b["metrics"]["per_task"], "subtraction": b["metrics"]["subtraction"]}
        for task, value in merged.items():
            assert table.loc[task, f"÷ {b['role']} {b['name']}"] == pytest.approx(value / theirs[task], rel=1e-6)


def test_a_run_directory_from_before_baseline_metrics_reads_them_as_experts(config):
    config.budget.evaluations = 1
    start_run(config, "test-config")
    db = sqlite3.connect(config.run_path() / "run.db")
    db.execute("ALTER TABLE baselines DROP COLUMN metrics_json")
    db.commit()
    db.close()
    store = RunStore(config.run_path(), readonly=True)
    assert [(b["role"], b["metrics"]) for b in store.baselines()] == [("expert", {})] * 3
    store.close()
    table = task_ratios(config.run_path())
    ratios = table.drop(columns="best merge")
    assert not ratios.loc["fitness"].isna().any() and ratios.drop(index="fitness").isna().all().all()  # no task means kept
    RunStore(config.run_path()).close()  # a writer adds the column back
    store = RunStore(config.run_path(), readonly=True)
    assert all(b["metrics"] == {} for b in store.baselines())
    store.close()
