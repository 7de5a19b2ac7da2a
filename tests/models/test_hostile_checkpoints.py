"""Checkpoints a user damages or mixes up by accident reach ``evomerge run`` as one line naming the
file, tensor or setting to fix, exit 2, and leave no run behind.

Each case was once a silent wrong merge or a traceback: transformers and peft initialise a
tensor a checkpoint lacks at random and only log it (a quieted log inside a search), a NaN weight
made every merge NaN while classifiers still scored it, the mmap tier read byte ranges safetensors
refuses, an adapter whose config's rank disagreed with its factors was composed at the wrong
scale, and an expert of another architecture stopped vocabulary alignment with a KeyError.
The models are untrained (a search over them is never run to the end): only loading matters.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import evomerge
from evomerge.cli import main
from cli_checks import refused
from evomerge.testing.tiny_models import digits_classifier

WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_TARGETS = ["q_proj", "v_proj"]


def edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None], name: str = WEIGHTS) -> None:
    state = load_file(str(folder / name))
    edit(state)
    save_file(state, str(folder / name), metadata={"format": "pt"})


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def rewrite_header(file: Path, edit: Callable[[dict], None]) -> None:
    """Edit a safetensors file's JSON header in place, keeping its data bytes."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def first_tensor(state_or_header: dict) -> str:
    return sorted(k for k in state_or_header if k != "__metadata__")[0]


def write_config(tmp_path: Path, models: dict, merge: dict, fitness: dict) -> Path:
    data = {
        "name": "hostile",
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "score_experts": False,
        "models": {"device": "cpu", **models},
        "merge": merge,
        "populations": [{"name": "p", "strategy": "random"}],
        "fitness": fitness,
        "budget": {"evaluations": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- full checkpoints: a digits MLP base and expert ---------------------------------------------


@pytest.fixture(scope="module")
def mlp_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-mlp")
    paths = {"base": root / "base", "expert": root / "expert"}
    for seed, path in enumerate(paths.values()):
        digits_classifier(seed).save_pretrained(path)
    return paths


def _drop_a_tensor(folder: Path) -> str:
    name = sorted(load_file(str(folder / WEIGHTS)))[-1]
    edit_weights(folder, lambda state: state.pop(name))
    return name


def _claim_every_tensor_in_one_shard(folder: Path) -> str:
    """An index whose weight map puts every tensor in the first of two shards (a hand-edited or
    half-copied index): transformers loads that shard only."""
    state = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    names = sorted(state)
    save_file({names[0]: state[names[0]]}, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({n: state[n] for n in names[1:]}, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = dict.fromkeys(names, "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names[1]


def _config_of_another_width(folder: Path) -> str:
    edit_json(folder / "config.json", hidden_sizes=[8])
    return "config.json"


def _nan_in_a_tensor(folder: Path) -> str:
    name = first_tensor(load_file(str(folder / WEIGHTS)))
    edit_weights(folder, lambda state: state[name].view(-1).__setitem__(3, float("nan")))
    return name


def _offsets_past_the_end(folder: Path) -> str:
    rewrite_header(folder / WEIGHTS, lambda h: h[first_tensor(h)]["data_offsets"].__setitem__(1, 10**6))
    return str(folder / WEIGHTS)


def _unknown_dtype(folder: Path) -> str:
    rewrite_header(folder / WEIGHTS, lambda h: h[first_tensor(h)].__setitem__("dtype", "F33"))
    return str(folder / WEIGHTS)


CHECKPOINT_CASES = {
    # (damage, residency, words besides what the damage returns)
    "a tensor dropped": (_drop_a_tensor, "host", ("stores no", "incomplete")),
    "an index naming the wrong shard": (_claim_every_tensor_in_one_shard, "host", ("stores no",)),
    "config.json of another width": (_config_of_another_width, "host", ("layers.0.bias", "(16,)", "(8,)")),
    "NaN in a weight": (_nan_in_a_tensor, "host", ("NaN",)),
    "NaN in a weight, memory-mapped": (_nan_in_a_tensor, "mmap", ("NaN", "expert 'expert'")),
    "byte ranges past the end, memory-mapped": (_offsets_past_the_end, "mmap", ("not a readable safetensors file",)),
    "an unknown dtype, memory-mapped": (_unknown_dtype, "mmap", ("F33",)),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_a_damaged_expert_checkpoint_is_refused_naming_what_to_fix(mlp_models, tmp_path, capsys, case):
    damage, residency, words = CHECKPOINT_CASES[case]
    expert = tmp_path / "expert"
    shutil.copytree(mlp_models["expert"], expert)
    named = damage(expert)
    path = write_config(
        tmp_path,
        {"base": str(mlp_models["base"]), "experts": [str(mlp_models["base"]), str(expert)], "residency": residency},
        {"method": "task_arithmetic", "granularity": "per_model"},
        {"name": "classification_accuracy", "data": {"source": "sklearn:digits", "limit": 20}},
    )
    refused(capsys, ["run", str(path)], named, *words)
    assert not (tmp_path / "run" / "run.db").exists()


def _cut_short(folder: Path) -> str:
    (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:100])
    return str(folder / WEIGHTS)


def _index_naming_a_missing_shard(folder: Path) -> str:
    _claim_every_tensor_in_one_shard(folder)
    (folder / "model-00001-of-00002.safetensors").unlink()
    return "model-00001-of-00002.safetensors"


def _config_not_json(folder: Path) -> str:
    (folder / "config.json").write_text('{"model_type": ')
    return str(folder / "config.json")


def _no_weights_at_all(folder: Path) -> str:
    (folder / WEIGHTS).unlink()
    return "holds no weights"


UNREADABLE_FILES = {
    "a weights file cut short": _cut_short,
    "an index naming a missing shard": _index_naming_a_missing_shard,
    "config.json that is not JSON": _config_not_json,
    "no weights at all": _no_weights_at_all,
}


@pytest.mark.parametrize("case", UNREADABLE_FILES)
def test_validate_reads_the_checkpoint_files_a_run_would_fail_on(mlp_models, tmp_path, capsys, case):
    """Before, validate said ok (it checked that the directory exists) and the run failed at load."""
    expert = tmp_path / "expert"
    shutil.copytree(mlp_models["expert"], expert)
    named = UNREADABLE_FILES[case](expert)
    path = write_config(
        tmp_path,
        {"base": str(mlp_models["base"]), "experts": [str(mlp_models["base"]), str(expert)]},
        {"method": "task_arithmetic", "granularity": "per_model"},
        {"name": "classification_accuracy", "data": {"source": "sklearn:digits", "limit": 20}},
    )
    refused(capsys, ["validate", str(path)], str(path), "models.experts.1.path", named)


REFUSED_WITHOUT_TORCH = """
import sys
import evomerge
from evomerge.cli import main
assert main(["validate", sys.argv[1]]) == 2
assert "torch" not in sys.modules, "validate imported torch to read a checkpoint's files"
"""


def test_validate_reads_checkpoint_files_without_torch(mlp_models, tmp_path):
    """The headers are read through safetensors' NumPy reader: validate stays torch-free."""
    expert = tmp_path / "expert"
    shutil.copytree(mlp_models["expert"], expert)
    _cut_short(expert)
    path = write_config(
        tmp_path,
        {"base": str(mlp_models["base"]), "experts": [str(expert)]},
        {"method": "task_arithmetic", "granularity": "per_model"},
        {"name": "classification_accuracy", "data": {"source": "sklearn:digits", "limit": 20}},
    )
    root = str(Path(evomerge.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", REFUSED_WITHOUT_TORCH, str(path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert str(expert / WEIGHTS) in done.stderr


def test_a_run_refused_for_its_expert_runs_once_the_expert_is_fixed(mlp_models, tmp_path, capsys):
    """Nothing the refused run left in its directory stands in the way of the corrected one."""
    expert = tmp_path / "expert"
    shutil.copytree(mlp_models["expert"], expert)
    _nan_in_a_tensor(expert)
    path = write_config(
        tmp_path,
        {"base": str(mlp_models["base"]), "experts": [str(mlp_models["base"]), str(expert)]},
        {"method": "task_arithmetic", "granularity": "per_model"},
        {"name": "classification_accuracy", "data": {"source": "sklearn:digits", "limit": 20}},
    )
    refused(capsys, ["run", str(path)], "NaN")
    shutil.rmtree(expert)
    shutil.copytree(mlp_models["expert"], expert)
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    assert "stopped: budget exhausted" in capsys.readouterr().out


# --- LoRA adapters and tokenizers: a tiny Llama base ----------------------------------------------


def _adapter(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter with random non-zero factors, saved as peft saves a trained one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory) -> dict[str, Path]:
    """A base, an adapter of it, an adapter of a wider Llama, an expert whose fine-tune added two
    tokens, and a GPT-2 of the same vocabulary."""
    from tokenizers import AddedToken
    from transformers import GPT2Config, GPT2LMHeadModel

    from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("hostile-llama")
    tokenizer = build_tokenizer()
    paths = {name: root / name for name in ("base", "wide", "adapter", "wide-adapter", "added-tokens", "gpt2")}
    for name, hidden in (("base", 32), ("wide", 48)):
        tiny_llama(tokenizer, hidden=hidden, layers=2, heads=2, seed=0).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    _adapter(paths["base"], paths["adapter"], seed=1)
    _adapter(paths["wide"], paths["wide-adapter"], seed=2)
    expert = tiny_llama(tokenizer, hidden=32, layers=2, heads=2, seed=3)
    own = build_tokenizer()
    own.add_tokens([AddedToken("<|user|>"), AddedToken("<|end|>", special=True)])
    expert.resize_token_embeddings(len(own), mean_resizing=False)
    expert.save_pretrained(paths["added-tokens"])  # its tokenizer left behind
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer))).save_pretrained(paths["gpt2"])
    tokenizer.save_pretrained(paths["gpt2"])
    (root / "data.jsonl").write_text(json.dumps({"prompt": "12+30=", "target": "42"}) + "\n")
    paths["data"] = root / "data.jsonl"
    return paths


def _drop_a_factor(adapter: Path) -> str:
    name = sorted(load_file(str(adapter / ADAPTER_WEIGHTS)))[0]
    edit_weights(adapter, lambda state: state.pop(name), ADAPTER_WEIGHTS)
    return name


def _rename_the_factors(adapter: Path) -> str:
    """Factors saved under another model's module names: peft loads none of them."""
    renamed = {k.replace(".model.layers.", ".transformer.h."): v for k, v in load_file(str(adapter / ADAPTER_WEIGHTS)).items()}
    save_file(renamed, str(adapter / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return "stores no"


def _config_rank_differs(adapter: Path) -> str:
    edit_json(adapter / "adapter_config.json", r=8)
    return "r: 8"


def _rank_zero(adapter: Path) -> str:
    edit_json(adapter / "adapter_config.json", r=0)
    return str(adapter / "adapter_config.json")


def _nan_in_a_factor(adapter: Path) -> str:
    name = sorted(k for k in load_file(str(adapter / ADAPTER_WEIGHTS)) if "lora_B" in k)[0]
    edit_weights(adapter, lambda state: state[name].view(-1).__setitem__(0, float("inf")), ADAPTER_WEIGHTS)
    return name


def _no_weights(adapter: Path) -> str:
    (adapter / ADAPTER_WEIGHTS).unlink()
    return "no adapter weights"


ADAPTER_CASES = {
    # (damage, merge method, words besides what the damage returns)
    "a factor dropped, as a dense expert": (_drop_a_factor, "task_arithmetic", ("stores no", "target_modules")),
    "factors under other names, as a dense expert": (_rename_the_factors, "task_arithmetic", ("model.layers.0",)),
    "config rank differs from the factors, composed": (_config_rank_differs, "lora_compose", ("of rank 4",)),
    "rank zero": (_rank_zero, "lora_compose", ("r must be a positive integer",)),
    "an infinite factor, composed": (_nan_in_a_factor, "lora_compose", ("NaN or infinite",)),
    "an infinite factor, as a dense expert": (_nan_in_a_factor, "task_arithmetic", ("NaN or infinite",)),
    "no weights file": (_no_weights, "lora_compose", ("adapter_config.json",)),
}


def _llama_config(tmp_path: Path, llama_models: dict[str, Path], experts: list[Path], method: str) -> Path:
    return write_config(
        tmp_path,
        {"base": str(llama_models["base"]), "experts": [str(e) for e in experts], "dtype": "float32"},
        {"method": method, "granularity": "per_model"},
        {"name": "negative_cross_entropy", "data": {"source": str(llama_models["data"])}},
    )


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_a_damaged_adapter_is_refused_naming_what_to_fix(llama_models, tmp_path, capsys, case):
    damage, method, words = ADAPTER_CASES[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_models["adapter"], adapter)
    named = damage(adapter)
    path = _llama_config(tmp_path, llama_models, [llama_models["adapter"], adapter], method)
    refused(capsys, ["run", str(path)], named, *words)
    assert not (tmp_path / "run" / "run.db").exists()


MISMATCHED_EXPERTS = {
    # (expert, words): peft's "Error(s) in loading state_dict for X:" said no more than that
    "wide-adapter": ("size mismatch for", "lora_A", "[4, 48]"),
    "gpt2": ("has no model.embed_tokens.weight", "LlamaForCausalLM"),
    "added-tokens": ("52 vocabulary rows", "no tokenizer", "has 50"),
}


@pytest.mark.parametrize("expert", MISMATCHED_EXPERTS)
def test_an_expert_that_does_not_fit_the_base_is_named(llama_models, tmp_path, capsys, expert):
    path = _llama_config(tmp_path, llama_models, [llama_models["adapter"], llama_models[expert]], "task_arithmetic")
    refused(capsys, ["run", str(path)], *MISMATCHED_EXPERTS[expert])
