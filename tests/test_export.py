"""Exports: a model card and recipe beside the weights, a mergekit YAML that mergekit turns into
the same weights, and LoRA merges exported as peft adapters that reload with the same score."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from evomerge.cli import main
from cli_checks import refused
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


def _run_and_export(root, tmp_path, merge: dict, experts=None, evaluations: int = 3, export: dict | None = None):
    """Run a search and export its best; every mergekit YAML it writes is rebuilt by mergekit."""
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "score_experts": True,
        "models": {
            "base": str(root / "base"),
            "experts": [str(e) if not isinstance(e, dict) else e for e in (experts or [root / "expert0", root / "expert1"])],
            "device": "cpu",
        },
        "merge": merge,
        "populations": [{"name": "search", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": evaluations},
    }
    if export is not None:
        config["export"] = export
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    store = RunStore(tmp_path / "run", readonly=True)
    best = store.best()
    store.close()
    if (out / "mergekit.yaml").exists() and importlib.util.find_spec("mergekit") is not None:
        _assert_mergekit_rebuilds(out, tmp_path)
    return out, best


def _assert_mergekit_rebuilds(out, tmp_path) -> None:
    """mergekit, given the export's YAML, writes the export's weights."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    document = yaml.safe_load((out / "mergekit.yaml").read_text())
    rebuilt = tmp_path / "mergekit-out"
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lora_merge_cache=str(tmp_path / "lora-cache"))
    run_merge(MergeConfiguration.model_validate(document), str(rebuilt), options=options)
    ours = load_file(out / "model.safetensors")
    theirs = load_file(rebuilt / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


MERGEKIT_CASES = {
    "linear per layer group": {"method": "linear", "granularity": "per_layer_group", "layer_groups": 2},
    "task arithmetic per tensor": {"method": "task_arithmetic", "granularity": "per_tensor", "search": ["weight"]},
    "ties per model": {"method": "ties", "granularity": "per_model"},
    "slerp per layer group": {"method": "slerp", "granularity": "per_layer_group", "layer_groups": 4},
}


@pytest.mark.parametrize("case", sorted(MERGEKIT_CASES))
def test_mergekit_rebuilds_the_exported_model_from_its_yaml(llamas, tmp_path, case):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    out, _best = _run_and_export(llamas, tmp_path, MERGEKIT_CASES[case])
    assert (out / "mergekit.yaml").exists()  # and _run_and_export had mergekit rebuild it


@pytest.fixture(scope="module")
def adapters(llamas, tmp_path_factory):
    """Two LoRA adapters of the base, with random (nonzero) factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    for i in range(2):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(llamas / "base")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(root / f"adapter{i}")
    return [root / "adapter0", root / "adapter1"]


def test_adapter_experts_are_base_plus_adapter_in_the_mergekit_yaml(llamas, adapters, tmp_path):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    merge = {"method": "task_arithmetic", "granularity": "per_layer_group", "layer_groups": 2}
    out, _best = _run_and_export(llamas, tmp_path, merge, adapters)
    document = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert [m["model"] for m in document["models"]] == [f"{llamas / 'base'}+{a}" for a in adapters]
    assert "--lora-merge-cache" in yaml.safe_load((out / "recipe.yaml").read_text())["mergekit"]


INSTRUCT_TEMPLATE = "{% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}"


@pytest.fixture(scope="module")
def instruct(llamas, tmp_path_factory):
    """An expert fine-tuned for chat: its own chat template, end-of-turn token and generation defaults."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = tmp_path_factory.mktemp("instruct") / "chat"
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "|"
    tokenizer.chat_template = INSTRUCT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(llamas / "expert1")
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, max_new_tokens=7)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_export_carries_the_named_experts_tokenizer_chat_template_and_eos(llamas, instruct, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    export = {"tokenizer_source": "chat", "base_model": "org/pretrained"}
    out, _best = _run_and_export(llamas, tmp_path, {"method": "task_arithmetic"}, [llamas / "expert0", instruct], export=export)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == INSTRUCT_TEMPLATE and tokenizer.eos_token == "|"
    eos = tokenizer.convert_tokens_to_ids("|")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == eos and generation.max_new_tokens == 7
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["base_model"] == ["org/pretrained"]
    assert "tokenizer and chat template are this directory's" in yaml.safe_load((out / "recipe.yaml").read_text())["mergekit"]


def test_a_chat_template_joins_the_bases_tokenizer(llamas, instruct, tmp_path):
    from transformers import AutoTokenizer

    export = {"chat_template": "chat"}
    out, _best = _run_and_export(llamas, tmp_path, {"method": "linear"}, [llamas / "expert0", instruct], export=export)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == INSTRUCT_TEMPLATE and tokenizer.eos_token == "<eos>"  # the base's end token
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tokenizer.convert_tokens_to_ids("<eos>")


def test_export_writes_a_model_card_with_recipe_and_scores(llamas, tmp_path):
    out, best = _run_and_export(llamas, tmp_path, {"method": "task_arithmetic", "granularity": "per_model"})
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "task_arithmetic" in front["tags"]
    assert f"{best.fitness:.4f}" in card
    assert "expert expert0: fitness" in card and "expert expert1: fitness" in card
    assert "## Recipe" in card and "mergekit-yaml" in card
    assert "base_model" not in front  # the run's models are local copies: no hub id is known
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


def test_lora_compose_exports_a_peft_adapter_that_reloads_with_the_same_score(llamas, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness.lm import negative_cross_entropy

    out, best = _run_and_export(llamas, tmp_path, {"method": "lora_compose", "granularity": "per_model"}, adapters)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["library_name"] == "peft"
    assert "not written" in yaml.safe_load((out / "recipe.yaml").read_text())["mergekit"]

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llamas / "base"), out).eval()
    score = negative_cross_entropy(reloaded, AutoTokenizer.from_pretrained(out), ROWS).mean().item()
    assert score == pytest.approx(best.fitness, abs=1e-5)


@pytest.fixture
def finished_run(llamas, tmp_path):
    out, _best = _run_and_export(llamas, tmp_path, {"method": "linear"}, evaluations=1)
    return tmp_path / "run"


def test_an_out_whose_disk_cannot_hold_the_model_is_refused_before_loading(finished_run, tmp_path, capsys, monkeypatch):
    """A 1 B-parameter export onto a 300 MiB disk loaded and merged for 2.5 minutes, then stopped
    with safetensors' traceback (exit 1) and left its half-written directory beside --out."""
    import shutil

    from evomerge.workers import whitebox

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    monkeypatch.setattr(whitebox, "WhiteBoxWorker", None)  # nothing may load
    out = tmp_path / "small" / "merged"
    refused(capsys, ["export", str(finished_run), "--out", str(out)], f"--out {out}", "needs", "free some space")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_disk_that_fills_up_while_writing_leaves_nothing_and_exits_2(finished_run, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def fills_up(self, folder, **kwargs):  # the shard is begun, then the disk is full
        real(self, folder, **kwargs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_up)
    out = tmp_path / "full" / "merged"
    refused(capsys, ["export", str(finished_run), "--out", str(out)], f"--out {out}", "disk filled up", "No space left")
    assert list(out.parent.iterdir()) == []  # no merged.tmp-* left
