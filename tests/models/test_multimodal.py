"""Image-text checkpoints (a tiny random Gemma 3 in the hub's key layout): layer groups per tower,
frozen towers, a run and an export that reloads as the same architecture, config and logits, and a
mergekit YAML whose filters name the stored tensors, which mergekit rebuilds."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.config import load_config
from evomerge.models import memory
from evomerge.models.zoo.tiny_lm import IMAGE_TOKENS, build_tokenizer, tiny_gemma3
from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.store import RunStore

ROWS = [{"prompt": "12+30=", "target": "42"}, {"prompt": "abc>", "target": "cba"}, {"prompt": "7+8=", "target": "15"}]
VISION = "model.vision_tower."


def _save_in_hub_layout(model, tokenizer, path) -> None:
    """``save_pretrained``, then the vision tower under ``vision_tower.vision_model.`` as the hub's
    Gemma 3 checkpoints store it (transformers 5 loads that prefix but writes its tower without it)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    renamed = {
        "vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") else k: v
        for k, v in state.items()
    }
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory):
    """A base and two experts that differ from it in every tower."""
    root = tmp_path_factory.mktemp("gemma3")
    tokenizer = build_tokenizer()
    base = tiny_gemma3(tokenizer, seed=0)
    _save_in_hub_layout(base, tokenizer, root / "base")
    for i in range(2):
        expert = tiny_gemma3(tokenizer, seed=0)
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        _save_in_hub_layout(expert, tokenizer, root / f"expert{i}")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def _load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).eval()


def test_the_fixture_is_in_the_hub_layout_and_loads_as_saved(gemmas):
    with safe_open(str(gemmas / "base" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "multi_modal_projector.mm_input_projection_weight" in keys
    model = _load(gemmas / "base")
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())
    reference = tiny_gemma3(build_tokenizer(), seed=0)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _write_config(root, tmp_path, merge: dict):
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "score_experts": False,
        "models": {"base": str(root / "base"), "experts": [str(root / "expert0"), str(root / "expert1")], "device": "cpu"},
        "merge": merge,
        "populations": [{"name": "search", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(root, tmp_path, merge: dict) -> tuple:
    path = _write_config(root, tmp_path, merge)
    assert main(["run", str(path)]) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    return path, out


def _config(path) -> dict:
    """The config as saved, less the dtype transformers copies into each sub-config when a model
    is loaded in an explicit dtype (the top-level dtype is compared)."""
    config = json.loads((path / "config.json").read_text())
    for sub in ("text_config", "vision_config"):
        config[sub].pop("dtype", None)
    return config


def _image_inputs() -> dict[str, torch.Tensor]:
    """A prompt with one image (begin, soft tokens, end) and text after it."""
    tokenizer = build_tokenizer()
    n = len(tokenizer)
    text = tokenizer("12+30=", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[n, *[n + 2] * IMAGE_TOKENS, n + 1, *text]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels}


def test_frozen_towers_run_and_export_reloads_as_the_same_model(gemmas, tmp_path):
    from evomerge.workers.whitebox import WhiteBoxWorker

    merge = {"method": "task_arithmetic", "granularity": "per_layer_group", "layer_groups": 2,
             "frozen": ["vision_tower", "multi_modal_projector"]}
    config_path, out = _run(gemmas, tmp_path, merge)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["frozen"] == ["vision_tower", "multi_modal_projector"]
    assert [g["name"] for g in recipe["recipe"]["groups"]] == ["language_model.layers.0-1", "language_model.layers.2-3"]
    assert not (out / "mergekit.yaml").exists() and "frozen towers" in recipe["mergekit"]

    exported = _load(out)
    base = _load(gemmas / "base")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert type(exported).__name__ == "Gemma3ForConditionalGeneration"
    assert _config(out) == _config(gemmas / "base")
    base_state = base.state_dict()
    for name, tensor in exported.named_parameters():  # the tied lm_head is the language model's embedding
        same = torch.equal(tensor, base_state[name])
        assert same == (not name.startswith("model.language_model.")), name  # frozen: the base's; merged: not

    store = RunStore(tmp_path / "run", readonly=True)
    best = store.best()
    store.close()
    config = load_config(config_path)
    worker = WhiteBoxWorker(RunPlan.from_config(config), worker_id="check")
    held = sum(p.numel() * p.element_size() for p in worker.models.model.parameters())
    for tensor in worker.models.materializer.tensors.values():  # the language model's only
        assert tensor.name.startswith("model.language_model.")
        held += (tensor.stack.numel() + tensor.reference.numel()) * tensor.stack.element_size()
    assert memory.tier_memory(config, torch.device("cpu"))["device"].resident == held
    worker.materialize(Candidate(best.candidate_id, best.population, best.genome))
    inputs = _image_inputs()
    with torch.no_grad():
        expected = worker.models.model(**inputs).logits
        reloaded = exported(**inputs).logits
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=0)


def test_a_frozen_name_that_is_no_tower_is_one_line_naming_the_towers(gemmas, tmp_path, capsys):
    assert main(["run", str(_write_config(gemmas, tmp_path, {"method": "task_arithmetic", "frozen": ["vision"]}))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merge: frozen: 'vision' is not a tower of this model" in err[0]
    assert "(towers: vision_tower, multi_modal_projector, language_model)" in err[0]


def test_mergekit_rebuilds_the_export_from_stored_tensor_names(gemmas, tmp_path):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    _config, out = _run(gemmas, tmp_path, {"method": "task_arithmetic", "granularity": "per_layer_group", "layer_groups": 2})
    document = yaml.safe_load((out / "mergekit.yaml").read_text())
    filters = {e["filter"] for e in document["models"][0]["parameters"]["weight"]}
    assert {"language_model.model.layers.0.", "vision_tower.vision_model.encoder.layers.0."} <= filters
    assert not any(f.startswith("model.") for f in filters)  # in-memory names would match nothing mergekit reads
    rebuilt = tmp_path / "mergekit-out"
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(document), str(rebuilt), options=options)
    ours, theirs = _load(out).state_dict(), _load(rebuilt).state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_an_image_text_model_without_a_causal_lm_entry_keeps_its_head(tmp_path):
    """LLaVA has no causal-LM Auto entry: it loads as its image-text class, lm_head included."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from evomerge.models.loading import parameter_names

    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8)
    LlavaConfig(text_config=text, vision_config=vision, image_token_index=63).save_pretrained(tmp_path)
    names = parameter_names(str(tmp_path))
    assert "lm_head.weight" in names
    assert any(n.startswith("model.vision_tower.") for n in names) and any(n.startswith("model.language_model.layers.1.") for n in names)
