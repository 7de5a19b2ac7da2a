"""The black-box worker passes the worker suite (``evomerge.testing.worker_suite``) against the
reference service on loopback, over the three skill adapters."""

from __future__ import annotations

import json

import pytest

from evomerge.config import config_from_dict
from evomerge.models.zoo.tiny_lm import skill_examples
from evomerge.plan import RunPlan
from evomerge.testing.worker_suite import WorkerSuite

KEY_ENV = "EVOMERGE_TEST_API_KEY"
EXPERTS = ["addition", "reversal", "subtraction"]


@pytest.fixture
def worker_config(service, auth, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, auth["Authorization"].removeprefix("Bearer "))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "target": r["target"]}) + "\n"
                            for r in skill_examples("addition", 8, seed=11)))

    def make(fitness: str | None = None):
        return config_from_dict(
            {
                "name": "blackbox-suite",
                "run_dir": str(tmp_path / "run"),
                "models": {"base": "tiny-base", "experts": EXPERTS},
                "merge": {"method": "lora_compose", "granularity": "per_model"},
                "populations": [{"name": "suite", "strategy": "random"}],
                "fitness": {"name": fitness or "negative_cross_entropy", "data": {"source": str(data)}},
                "budget": {"evaluations": 2},
                "api": {"level": "merge_service", "base_url": service, "api_key_env": KEY_ENV},
            },
            "test-config",
            tmp_path,
        )

    return make


@pytest.fixture
def genome(worker_config):
    return RunPlan.from_config(worker_config()).space([]).encode({"alpha": 1.0, "beta": 1 / len(EXPERTS)})


class TestBlackBoxWorker(WorkerSuite):
    pass
