"""Real architectures beyond Llama, as tiny random models: their layer groups follow their blocks
(``gpt_neox.layers.N``, ``transformer.h.N``, MoE layers, two towers of a VLM, not a projector's
``nn.Sequential``); a path's scales fold exactly into each declared architecture; a data-flow run
on a model a path cannot route through, or whose scales cannot fold, is refused by ``validate``;
a ``mergekit.yaml`` is written only where the installed mergekit reads the architecture (GPT-NeoX,
Falcon, LLaVA and Qwen2-VL it does not); and end to end, ``run`` and ``export`` write a model
that reloads with its own Auto class and equals the recorded recipe merged by hand, and mergekit
rebuilds it wherever a YAML is written."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.models.zoo.tiny_lm import build_tokenizer

V = 50  # the tiny character tokenizer's vocabulary
ROWS = [{"prompt": "12+30=", "target": "42"}, {"prompt": "abc>", "target": "cba"}, {"prompt": "7+8=", "target": "15"}]
VLMS = ("llava", "qwen2_vl")


def _config(arch: str):
    """A tiny config of ``arch``: 4 decoder layers of hidden size 32, norms with a tiny epsilon (the
    one inexactness of folding a path's scales into weights)."""
    import transformers as T

    ids = dict(vocab_size=V, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, max_position_embeddings=64)
    llamaish = dict(**shape, **ids, num_key_value_heads=1, rms_norm_eps=1e-12)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=16, tie_word_embeddings=False)
    if arch == "qwen3":
        return T.Qwen3Config(**llamaish, head_dim=16, tie_word_embeddings=False)
    if arch == "olmo2":
        return T.Olmo2Config(**llamaish, tie_word_embeddings=False)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**shape, **ids, layer_norm_eps=1e-12)
    if arch == "falcon":  # falcon-7b's layout: parallel attention, tied head
        return T.FalconConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, **ids)
    if arch == "phi":
        return T.PhiConfig(**shape, **ids, layer_norm_eps=1e-12)
    if arch == "phi3":
        return T.Phi3Config(**llamaish, tie_word_embeddings=False)
    if arch == "stablelm":
        return T.StableLmConfig(**shape, **ids, num_key_value_heads=1, layer_norm_eps=1e-12)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1)
    if arch == "gemma3_text":
        return T.Gemma3TextConfig(**llamaish, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
    if arch == "mixtral":
        return T.MixtralConfig(**llamaish, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(**llamaish, num_experts=4, shared_expert_intermediate_size=32, **moe)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(**llamaish, head_dim=16, num_experts=4, **moe)
    if arch == "llava":
        vision = T.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16
        )
        return T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**llamaish), image_token_index=V, vocab_size=V + 1)
    if arch == "qwen2_vl":
        text = dict(**llamaish, model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
        vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        return T.Qwen2VLConfig(
            text_config=text, vision_config=vision, image_token_id=V, video_token_id=V + 1,
            vision_start_token_id=V + 2, vision_end_token_id=V + 3, vocab_size=V + 4,
        )
    raise KeyError(arch)


def _auto(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if arch in VLMS else AutoModelForCausalLM


def _model(arch: str, seed: int | None):
    """The base (seed None) or an expert: the base plus seeded noise on every tensor."""
    torch.manual_seed(0)
    model = _auto(arch).from_config(_config(arch))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(arch)``: a directory with base/, expert0/, expert1/ (each with the tokenizer) and data.jsonl."""
    root, built = tmp_path_factory.mktemp("architectures"), {}

    def build(arch: str):
        if arch not in built:
            tokenizer = build_tokenizer()
            for name, seed in (("base", None), ("expert0", 10), ("expert1", 11)):
                _model(arch, seed).save_pretrained(root / arch / name)
                tokenizer.save_pretrained(root / arch / name)
            (root / arch / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
            built[arch] = root / arch
        return built[arch]

    return build


# --- layer groups ------------------------------------------------------------------------------

BLOCK = re.compile(r"^(?:model|gpt_neox|transformer)\.(?:layers|h)\.(\d+)\.")  # a single stack's block
ARCHS = ["qwen3", "olmo2", "gpt_neox", "falcon", "phi", "phi3", "stablelm", "gpt2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "llava", "qwen2_vl"]
STACKS = {
    "gpt_neox": ["gpt_neox.layers"],
    "falcon": ["transformer.h"],
    "gpt2": ["transformer.h"],
    "phi": ["model.layers"],
    "mixtral": ["model.layers"],  # in-memory experts are fused: model.layers.N.mlp.experts.gate_up_proj
    "llava": ["model.vision_tower.encoder.layers", "model.language_model.layers"],
    "qwen2_vl": ["model.visual.blocks", "model.language_model.layers"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_groups_follow_each_architectures_blocks(arch):
    from evomerge.space.merge_space import group_tensors

    with torch.device("meta"):
        names = [n for n, _ in _auto(arch).from_config(_config(arch)).named_parameters()]
    labels, groups = group_tensors(names, "per_layer_group", 2)
    group_of = {name: labels[g] for name, g in zip(names, groups)}
    stacks = STACKS.get(arch, ["model.layers"])
    single = len(stacks) == 1
    for stack in stacks:
        block = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
        layers = {name: int(m.group(1)) for name in names if (m := block.match(name))}
        depth = 1 + max(layers.values())
        k = min(2, depth)
        for name, layer in layers.items():
            members = [i for i in range(depth) if i * k // depth == layer * k // depth]
            span = f"{members[0]}-{members[-1]}" if len(members) > 1 else f"{members[0]}"
            want = (f"layers {span}" if len(members) > 1 else f"layer {span}") if single else f"{stack.removeprefix('model.')}.{span}"
            assert group_of[name] == want, name
    if single:
        assert labels == ["layers 0-1", "layers 2-3"]
    if arch == "qwen2_vl":  # the projector's nn.Sequential (mlp.0, GELU, mlp.2) is no stack: it follows the blocks
        assert {group_of[n] for n in names if ".merger." in n} == {"visual.blocks.1"}
        assert labels == ["visual.blocks.0", "visual.blocks.1", "language_model.layers.0-1", "language_model.layers.2-3", "lm_head"]


# --- data-flow paths ---------------------------------------------------------------------------

FOLDED = ["qwen3", "phi3", "stablelm", "phi", "gpt_neox", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "llava", "qwen2_vl"]


@pytest.mark.parametrize("arch", FOLDED)
@torch.no_grad()
def test_a_paths_scales_fold_exactly_into_the_exported_weights(arch):
    from evomerge.models.path_export import stacked_model
    from evomerge.space.paths import Path
    from evomerge.workers.path_model import PathMaterializer

    paths = PathMaterializer.from_models([_model(arch, 1), _model(arch, 2)])
    path = Path(((0, 0), (1, 2), (1, 0), (0, 0), (0, 1)), (1.0, 0.5, 1.3, 1.7, 0.8))
    paths.apply(path)
    ids = torch.tensor([[3, 17, 5, 42, 9, 11, 2]])
    expected = paths.model(input_ids=ids).logits
    exported = stacked_model(paths, path)
    torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    unscaled = stacked_model(paths, Path(path.layers, (1.0,) * 5))(input_ids=ids).logits
    assert (unscaled - expected).abs().max() > 1e-2  # the scales matter: the fold did the work


def _dataflow_config(root, tmp_path, scaling: str) -> str:
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "models": {"experts": [str(root / "expert0"), str(root / "expert1")], "device": "cpu"},
        "merge": {"space": "dataflow", "dataflow": {"repeats": 1, "scaling": scaling, "max_layers": 6}},
        "populations": [{"name": "search", "strategy": "random", "options": {"include_x0": False}}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 3},
    }
    path = tmp_path / "dataflow.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    "arch, scaling, words",
    [
        ("gpt2", "none", "models.experts.0: a GPT2LMHeadModel has no decoder layer list a data-flow path can route through"),
        ("falcon", "none", "models.experts.0: a FalconForCausalLM has no decoder layer list"),
        ("olmo2", "per_slot", "merge.dataflow.scaling: scales cannot be folded exactly into a olmo2 model's weights"),
    ],
)
def test_a_dataflow_search_that_could_not_run_or_export_is_refused_by_validate(saved, tmp_path, capsys, arch, scaling, words):
    config = _dataflow_config(saved(arch), tmp_path, scaling)
    capsys.readouterr()  # the fixture's save_pretrained progress
    assert main(["validate", config]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


# --- mergekit: written only where the installed mergekit reads the architecture -----------------


@pytest.mark.parametrize(
    "arch, why",
    [
        ("qwen3", None),
        ("olmo2", None),
        ("gpt2", None),  # tied head: mergekit's definition makes lm_head optional
        ("phi", None),
        ("phi3", None),
        ("stablelm", None),
        ("gemma3_text", None),
        ("mixtral", None),  # experts fused on load: mergekit builds them from the stored parts
        ("qwen3_moe", None),
        ("qwen2_moe", "has no definition of the Qwen2MoeForCausalLM architecture"),
        ("gpt_neox", "definition needs the tensor 'gpt_neox.layers.0.attention.bias'"),  # buffers transformers no longer saves
        ("falcon", "definition needs the tensor 'transformer.h.0.ln_attn.bias'"),  # only falcon-40b's layout
        ("llava", "has no definition of the LlavaForConditionalGeneration architecture"),
        ("qwen2_vl", "mergekit cannot read the Qwen2VLForConditionalGeneration config"),
    ],
)
def test_mergekit_reads_the_architecture_or_the_export_says_why_not(saved, arch, why):
    pytest.importorskip("mergekit", reason="the check reads the installed mergekit's definitions")
    from evomerge.mergekit_check import rebuild_problem

    root = saved(arch)
    document = {"merge_method": "linear", "models": [{"model": str(root / "expert0")}, {"model": str(root / "expert1")}], "dtype": "float32"}
    problem = rebuild_problem(document, root / "base")
    assert problem is None if why is None else why in (problem or ""), problem


def test_a_yaml_whose_filters_miss_a_tensor_mergekit_writes_is_not_written(saved):
    pytest.importorskip("mergekit", reason="the check reads the installed mergekit's definitions")
    from evomerge.mergekit_check import rebuild_problem

    root = saved("qwen3")
    by_layer = [{"filter": "model.layers.", "value": 0.5}]  # mergekit would find no weight for the embeddings
    models = [{"model": str(root / f"expert{i}"), "parameters": {"weight": by_layer}} for i in range(2)]
    problem = rebuild_problem({"merge_method": "linear", "models": models, "dtype": "float32"}, root / "base")
    assert "names the tensor 'model.embed_tokens.weight', which no filter of the YAML matches" in problem


def test_a_moe_passthrough_is_written_as_mergekit_builds_fused_experts_from_the_checkpoints_parts(saved, tmp_path):
    """transformers 5 fuses Mixtral's experts on load (stored ``experts.N.w1.weight``, loaded
    ``mlp.experts.gate_up_proj``), and mergekit's definition names the fused tensor, which it
    builds from the stored parts: the check follows that conversion, and mergekit rebuilds the path."""
    pytest.importorskip("mergekit", reason="the check reads the installed mergekit's definitions")
    from evomerge.mergekit_check import rebuild_problem
    from evomerge.mergekit_recipe import passthrough_config
    from evomerge.models.path_export import stacked_model
    from evomerge.space.paths import Path
    from evomerge.workers.path_model import PathMaterializer

    root = saved("mixtral")
    path = Path(((1, 1), (0, 0), (0, 1), (0, 1), (1, 2)), (1.0,) * 5)
    paths = PathMaterializer.from_models([_auto("mixtral").from_pretrained(root / f"expert{i}") for i in range(2)])
    stacked_model(paths, path).save_pretrained(tmp_path / "out")
    document = passthrough_config(path, [str(root / "expert0"), str(root / "expert1")], "float32")
    assert rebuild_problem(document, tmp_path / "out") is None
    (tmp_path / "out" / "mergekit.yaml").write_text(yaml.safe_dump(document))
    _assert_mergekit_rebuilds(tmp_path / "out", tmp_path, "mixtral")


# --- end to end: validate, run, export, reload, the recipe by hand, mergekit --------------------


def _run_and_export(root, tmp_path, merge: dict) -> tuple:
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "models": {"base": str(root / "base"), "experts": [str(root / "expert0"), str(root / "expert1")], "device": "cpu"},
        "merge": merge,
        # without x0, every candidate's layer groups take different values
        "populations": [{"name": "search", "strategy": "random", "options": {"include_x0": False}}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path)]) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    return out, yaml.safe_load((out / "recipe.yaml").read_text())


def _by_hand(root, arch: str, recipe: dict) -> dict[str, torch.Tensor]:
    """base + λ Σ w_i τ_i with each parameter's group found here (block N of 4 in group N // 2;
    before the blocks the first group, after them the last; a tied head is its embedding)."""
    groups = recipe["groups"]
    assert [g["name"] for g in groups] == ["layers 0-1", "layers 2-3"]
    parameters = lambda name: dict(_auto(arch).from_pretrained(root / name).named_parameters())  # noqa: E731 — a tied head once
    base, experts = parameters("base"), [parameters(f"expert{i}") for i in range(2)]
    merged, seen_block = {}, False
    for name, tensor in base.items():
        match = BLOCK.match(name)
        seen_block = seen_block or match is not None
        group = groups[int(match.group(1)) // 2 if match else (1 if seen_block else 0)]
        weights = group["weight"]
        merged[name] = tensor + group["lambda"] * sum(w * (e[name] - tensor) for w, e in zip(weights, experts))
    return merged


def _assert_mergekit_rebuilds(out, tmp_path, arch: str) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    document = yaml.safe_load((out / "mergekit.yaml").read_text())
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(document), str(tmp_path / "mergekit-out"), options=options)
    theirs = _auto(arch).from_pretrained(tmp_path / "mergekit-out").state_dict()
    for name, tensor in _auto(arch).from_pretrained(out).state_dict().items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


END_TO_END = {
    "qwen3": "written",
    "gpt2": "written",
    "mixtral": "converts the checkpoint's tensor",  # experts fused on load: no filter names one
    "gpt_neox": "definition needs the tensor",
    "qwen2_vl": "cannot read the Qwen2VLForConditionalGeneration config",
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(END_TO_END))
def test_run_export_reload_equals_the_recipe_by_hand_and_mergekit_where_written(saved, tmp_path, arch):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    root = saved(arch)
    out, document = _run_and_export(root, tmp_path, {"method": "task_arithmetic", "granularity": "per_layer_group", "layer_groups": 2})
    exported = _auto(arch).from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(exported).__name__]
    assert type(exported).__name__ == json.loads((root / "base" / "config.json").read_text())["architectures"][0]
    recipe = document["recipe"]
    assert len({str(g["weight"]) for g in recipe["groups"]}) == len(recipe["groups"])  # the groups differ
    if arch not in VLMS:
        state = dict(exported.named_parameters())
        for name, tensor in _by_hand(root, arch, recipe).items():
            torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if END_TO_END[arch] == "written":
        assert "mergekit" not in document
        _assert_mergekit_rebuilds(out, tmp_path, arch)
    else:
        assert not (out / "mergekit.yaml").exists() and END_TO_END[arch] in document["mergekit"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_neox", "qwen3_moe"])
def test_a_scaled_path_runs_and_exports_on_newly_folded_architectures(saved, tmp_path, arch):
    root = saved(arch)
    path = _dataflow_config(root, tmp_path, "per_slot")
    assert main(["validate", path]) == 0 and main(["run", path]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert type(_auto(arch).from_pretrained(tmp_path / "out")).__name__ == json.loads((root / "base" / "config.json").read_text())["architectures"][0]
