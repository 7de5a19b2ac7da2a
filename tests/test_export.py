"""Exports: a model card and recipe beside the weights, a mergekit YAML that mergekit turns into
the same weights, and LoRA merges exported as peft adapters that reload with the same score."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama
from evomerge.store import RunStore

ROWS = [{"prompt": "12+30=", "target": "42"}, {"prompt": "abc>", "target": "cba"}, {"prompt": "7+8=", "target": "15"}]


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tokenizer = build_tokenizer()
    base = tiny_llama(tokenizer, hidden=32, layers=4, heads=2, seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for i in range(2):
        expert = tiny_llama(tokenizer, hidden=32, layers=4, heads=2, seed=0)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn_like(p))
        expert.save_pretrained(root / f"expert{i}")
        tokenizer.save_pretrained(root / f"expert{i}")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def _run_and_export(root, tmp_path, merge: dict, experts=None, evaluations: int = 3):
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "score_experts": True,
        "models": {
            "base": str(root / "base"),
            "experts": [str(e) for e in (experts or [root / "expert0", root / "expert1"])],
            "device": "cpu",
        },
        "merge": merge,
        "populations": [{"name": "search", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": evaluations},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    store = RunStore(tmp_path / "run", readonly=True)
    best = store.best()
    store.close()
    return out, best


MERGEKIT_CASES = {
    "linear per layer group": {"method": "linear", "granularity": "per_layer_group", "layer_groups": 2},
    "task arithmetic per tensor": {"method": "task_arithmetic", "granularity": "per_tensor", "search": ["weight"]},
    "ties per model": {"method": "ties", "granularity": "per_model"},
    "slerp per layer group": {"method": "slerp", "granularity": "per_layer_group", "layer_groups": 4},
}


@pytest.mark.parametrize("case", sorted(MERGEKIT_CASES))
def test_mergekit_rebuilds_the_exported_model_from_its_yaml(llamas, tmp_path, case):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    out, _best = _run_and_export(llamas, tmp_path, MERGEKIT_CASES[case])
    document = yaml.safe_load((out / "mergekit.yaml").read_text())
    rebuilt = tmp_path / "mergekit-out"
    run_merge(
        MergeConfiguration.model_validate(document),
        str(rebuilt),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    ours = load_file(out / "model.safetensors")
    theirs = load_file(rebuilt / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_export_writes_a_model_card_with_recipe_and_scores(llamas, tmp_path):
    out, best = _run_and_export(llamas, tmp_path, {"method": "task_arithmetic", "granularity": "per_model"})
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "task_arithmetic" in front["tags"]
    assert f"{best.fitness:.4f}" in card
    assert "expert expert0: fitness" in card and "expert expert1: fitness" in card
    assert "## Recipe" in card and "mergekit-yaml" in card
    assert yaml.safe_load((out / "recipe.yaml").read_text())["candidate_id"] == best.candidate_id


def test_seed_recipe_exports_say_why_there_is_no_mergekit_yaml(llamas, tmp_path):
    config_merge = {"method": "linear", "granularity": "per_model"}
    root = llamas
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "models": {"experts": [str(root / "expert0"), str(root / "expert1")], "device": "cpu"},
        "merge": config_merge,
        "populations": [{"name": "m2n2", "strategy": "m2n2", "options": {"archive": "seed_recipes", "archive_size": 2}}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 4},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "mergekit.yaml").exists()
    assert "seed recipes" in yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["mergekit"]


def test_lora_compose_exports_a_peft_adapter_that_reloads_with_the_same_score(llamas, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness.lm import negative_cross_entropy

    adapters = []
    for i in range(2):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(llamas / "base")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(tmp_path / f"adapter{i}")
        adapters.append(tmp_path / f"adapter{i}")
    out, best = _run_and_export(llamas, tmp_path, {"method": "lora_compose", "granularity": "per_model"}, adapters)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["library_name"] == "peft"
    assert "not written" in yaml.safe_load((out / "recipe.yaml").read_text())["mergekit"]

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llamas / "base"), out).eval()
    score = negative_cross_entropy(reloaded, AutoTokenizer.from_pretrained(out), ROWS).mean().item()
    assert score == pytest.approx(best.fitness, abs=1e-5)
