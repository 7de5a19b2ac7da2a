"""Broken weight files are one ``ModelLoadError`` naming the file: safetensors' own errors
("incomplete metadata", "header too small") name none, and a model or adapter may hold several."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evomerge.errors import ModelLoadError
from evomerge.models.adapters import adapter_factors
from evomerge.models.loading import load_model
from evomerge.models.memory import adapter_numel


def truncated(path: Path, keep: float) -> Path:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return path


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """A LoRA adapter directory whose weights file lost its second half."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}))
    factors = {"base_model.model.q.lora_A.weight": torch.ones(2, 8), "base_model.model.q.lora_B.weight": torch.ones(8, 2)}
    save_file(factors, str(folder / "adapter_model.safetensors"))
    truncated(folder / "adapter_model.safetensors", 0.5)
    return folder


def test_a_truncated_adapter_is_named_by_the_memory_check_and_the_loader(adapter_dir):
    weights = str(adapter_dir / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file") as measured:
        adapter_numel(str(adapter_dir))
    with pytest.raises(ModelLoadError, match="not a readable safetensors file") as loaded:
        adapter_factors(str(adapter_dir), torch.device("cpu"), torch.float32, 1.0)
    assert weights in str(measured.value) and weights in str(loaded.value)


def test_the_broken_shard_of_a_sharded_model_is_named(tmp_path, digit_models):
    """Only the second of two shards is broken: the message names it, not the first."""
    from evomerge.models.loading import register_builtin_architectures

    register_builtin_architectures()
    model = load_model(str(digit_models["low"]), torch.device("cpu"), torch.float32)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="8KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2
    truncated(shards[1], 0.0)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), torch.device("cpu"), torch.float32)
    assert str(shards[1]) in str(info.value) and "\n" not in str(info.value)
