"""What a checkpoint says about itself: ``models.dtype: auto`` takes the dtype the checkpoints are
stored in, and a model card names a hub id only where one is known."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.config import config_from_dict
from evomerge.errors import ConfigError
from evomerge.models.checkpoint import hub_id, run_dtype, stored_dtype, tensor_dtypes
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One tiny Llama saved in float32, bfloat16 and float16."""
    root = tmp_path_factory.mktemp("stored")
    tokenizer = build_tokenizer()
    model = tiny_llama(tokenizer, hidden=16, layers=1, heads=2, seed=0)
    for dtype in ("float32", "bfloat16", "float16"):
        model.to(getattr(torch, dtype)).save_pretrained(root / dtype)
    return root


def _config(root, base: str | None, experts: list[str], dtype: str = "auto"):
    models = {"experts": [str(root / e) for e in experts], "dtype": dtype}
    if base is not None:
        models["base"] = str(root / base)
    return config_from_dict({
        "models": models,
        "populations": [{"name": "p"}],
        "fitness": {"data": {"source": "x.jsonl"}},
        "budget": {"evaluations": 1},
    })


def test_auto_is_the_dtype_the_checkpoints_are_stored_in(stored):
    assert run_dtype(_config(stored, "bfloat16", ["bfloat16", "bfloat16"])) == "bfloat16"
    assert run_dtype(_config(stored, None, ["float32", "float32"])) == "float32"
    assert run_dtype(_config(stored, "bfloat16", ["bfloat16"], dtype="float16")) == "float16"  # an explicit dtype wins


def test_auto_over_checkpoints_that_differ_is_the_widest(stored):
    assert run_dtype(_config(stored, "bfloat16", ["float32", "bfloat16"])) == "float32"
    assert run_dtype(_config(stored, "bfloat16", ["float16"])) == "float32"  # neither holds the other


def test_without_a_recorded_dtype_the_weights_say(stored, tmp_path):
    folder = tmp_path / "unrecorded"
    folder.mkdir()
    for file in (stored / "bfloat16").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    assert stored_dtype(str(folder)) == "bfloat16"


def test_tensors_are_those_transformers_loads(stored, tmp_path):
    """A sharded checkpoint is read through its index; another .safetensors beside it (Mistral's
    consolidated.safetensors) is not the model's."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    single = tensor_dtypes(str(stored / "bfloat16"))
    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(stored / "bfloat16").save_pretrained(folder, max_shard_size="4KB")
    save_file({"tok_embeddings.weight": torch.zeros(2)}, str(folder / "consolidated.safetensors"))
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    assert tensor_dtypes(str(folder)) == single and set(single.values()) == {"BF16"}


def test_a_checkpoint_in_a_dtype_runs_do_not_hold_asks_for_models_dtype(stored, tmp_path):
    folder = tmp_path / "wide"
    tiny_llama(build_tokenizer(), hidden=16, layers=1, heads=2).to(torch.float64).save_pretrained(folder)
    config = _config(tmp_path, "wide", ["wide"])
    with pytest.raises(ConfigError, match=r"stored in float64; set models.dtype to one of float32, bfloat16, float16"):
        run_dtype(config)


def test_hub_ids_are_named_and_local_paths_never(stored, tmp_path):
    assert hub_id("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"  # a reference the run downloads
    assert hub_id(str(stored / "float32")) is None  # a local model with no record of where it came from
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert hub_id(str(snapshot)) == "meta-llama/Llama-3.1-8B"
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "config.json").write_text(json.dumps({"_name_or_path": "WizardLMTeam/WizardMath-7B-V1.1"}))
    assert hub_id(str(recorded)) == "WizardLMTeam/WizardMath-7B-V1.1"
    (recorded / "config.json").write_text(json.dumps({"_name_or_path": str(stored / "float32")}))
    assert hub_id(str(recorded)) is None
