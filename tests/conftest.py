"""Shared fixtures: tiny locally trained experts and config files in temporary directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # see research/ray.md: a token would break `ray start` later
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Fixtures shared across folders: the reference service and tiny adapters (service/, server/,
# workers/), a provider that misbehaves on cue (workers/), and merge set-ups and tensor contexts
# (merge/, workers/, space/).
pytest_plugins = ["fixtures_service", "fixtures_merge", "fixtures_provider"]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` skip, in one place and with one reason, where torch sees no GPU (this
    box and CI); on a GPU machine ``pytest -m cuda`` runs them."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def digit_models(tmp_path_factory) -> dict[str, Path]:
    """Base + two digit specialists (0-4, 5-9) saved with save_pretrained, trained once."""
    from evomerge.demo import prepare_digit_experts

    root = tmp_path_factory.mktemp("digit-models")
    paths = {"base": root / "base", "low": root / "digits-0-4", "high": root / "digits-5-9"}
    prepare_digit_experts(paths["base"], [paths["low"], paths["high"]], seed=0)
    return paths


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """Digits training examples as .npz, so Ray actors need not import scikit-learn (seconds each)."""
    import numpy as np

    from evomerge.fitness.data import load_examples

    examples = load_examples("sklearn:digits", "train", limit=400)
    path = tmp_path_factory.mktemp("digits-data") / "digits.npz"
    np.savez(path, inputs=examples["inputs"].numpy(), labels=examples["labels"].numpy())
    return path


@pytest.fixture
def digits_config(tmp_path, digit_models):
    """Write a small, valid digits config into tmp_path; keyword overrides replace sections."""

    def write(**overrides) -> Path:
        data = {
            "name": "test-run",
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "executor": "inline",  # controller logic; Ray runs have their own tests
            "score_experts": False,  # tests count fitness calls; tests/test_report.py turns it on
            "models": {
                "base": str(digit_models["base"]),
                "experts": [str(digit_models["low"]), str(digit_models["high"])],
                "device": "cpu",
            },
            "merge": {
                "method": "task_arithmetic",
                "granularity": "per_layer_group",
                "search": ["weight"],
                "fixed": {"lambda": 1.0},
                "init": {"weight": 0.5},
            },
            "populations": [{"name": "cma", "strategy": "cmaes"}],
            "fitness": {
                "name": "classification_accuracy",
                "data": {"source": "sklearn:digits", "split": "train"},
                "test_data": {"source": "sklearn:digits", "split": "test"},
            },
            "budget": {"evaluations": 24},
            "checkpoint_every": 5,
        }
        for key, value in overrides.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write
