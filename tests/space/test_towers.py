"""Towers of a multimodal model: layer groups per stack, named by stack; frozen towers left out."""

from __future__ import annotations

import pytest

from evomerge.merge import MERGE_METHODS
from evomerge.space.merge_space import Space, group_tensors
from evomerge.space.towers import Towers

# In-memory parameter order of a Gemma3ForConditionalGeneration (transformers 5), abridged.
GEMMA3 = [
    "model.vision_tower.embeddings.patch_embedding.weight",
    *(f"model.vision_tower.encoder.layers.{i}.mlp.fc1.weight" for i in range(4)),
    "model.vision_tower.post_layernorm.weight",
    "model.multi_modal_projector.mm_input_projection_weight",
    "model.language_model.embed_tokens.weight",
    *(f"model.language_model.layers.{i}.{part}" for i in range(6) for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight")),
    "model.language_model.norm.weight",
]
LINEAR = MERGE_METHODS["linear"]


def test_towers_are_named_by_the_segment_after_the_stacks_shared_prefix():
    towers = Towers.of(GEMMA3)
    assert towers is not None and towers.shared_prefix == "model."
    assert towers.names(GEMMA3) == ["vision_tower", "multi_modal_projector", "language_model"]
    assert towers.tower("lm_head.weight") == "lm_head"  # outside the shared prefix: its own
    assert Towers.of(["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w", "lm_head.weight"]) is None


def test_vision_block_and_language_block_of_one_index_are_different_groups():
    names, groups = group_tensors(GEMMA3, "per_layer_group", None)
    group_of = {n: names[g] for n, g in zip(GEMMA3, groups)}
    assert group_of["model.vision_tower.encoder.layers.3.mlp.fc1.weight"] == "vision_tower.encoder.layers.3"
    assert group_of["model.language_model.layers.3.mlp.up_proj.weight"] == "language_model.layers.3"
    assert group_of["model.multi_modal_projector.mm_input_projection_weight"] == "multi_modal_projector"
    # tensors outside a tower's layers join its first group before them, its last after them
    assert group_of["model.vision_tower.embeddings.patch_embedding.weight"] == "vision_tower.encoder.layers.0"
    assert group_of["model.vision_tower.post_layernorm.weight"] == "vision_tower.encoder.layers.3"
    assert group_of["model.language_model.embed_tokens.weight"] == "language_model.layers.0"
    assert group_of["model.language_model.norm.weight"] == "language_model.layers.5"
    assert len(names) == 4 + 1 + 6


def test_layer_groups_split_each_stack_and_a_shallower_stack_keeps_one_group_per_layer():
    names, _ = group_tensors(GEMMA3, "per_layer_group", 5)
    assert names == [
        *(f"vision_tower.encoder.layers.{i}" for i in range(4)),
        "multi_modal_projector",
        "language_model.layers.0-1", *(f"language_model.layers.{i}" for i in range(2, 6)),
    ]
    names, _ = group_tensors(GEMMA3, "per_layer_group", 2)
    assert names == ["vision_tower.encoder.layers.0-1", "vision_tower.encoder.layers.2-3", "multi_modal_projector",
                     "language_model.layers.0-2", "language_model.layers.3-5"]
    with pytest.raises(ValueError, match="between 1 and the model's 6 layers"):
        group_tensors(GEMMA3, "per_layer_group", 7)


@pytest.mark.parametrize("granularity", ["per_model", "per_layer_group", "per_tensor"])
def test_frozen_towers_are_left_out_of_the_merge(granularity):
    space = Space.build(LINEAR, GEMMA3, 2, granularity=granularity, frozen=["vision_tower", "multi_modal_projector"])
    assert set(space.tensor_groups) == {n for n in GEMMA3 if n.startswith("model.language_model.")}
    if granularity == "per_layer_group":
        assert space.group_names == [f"language_model.layers.{i}" for i in range(6)]
    full = Space.build(LINEAR, GEMMA3, 2, granularity=granularity)
    assert space.dim < full.dim or granularity == "per_model"


@pytest.mark.parametrize(
    "names, frozen, words",
    [
        (GEMMA3, ["vision"], "'vision' is not a tower of this model \\(towers: vision_tower, multi_modal_projector, language_model\\)"),
        (GEMMA3, ["vision_tower", "multi_modal_projector", "language_model"], "nothing to merge"),
        (["model.layers.0.w", "model.layers.1.w"], ["model"], "single stack"),
    ],
)
def test_frozen_names_must_be_towers_and_leave_one(names, frozen, words):
    with pytest.raises(ValueError, match=words):
        Space.build(LINEAR, names, 2, granularity="per_model", frozen=frozen)


def test_a_projectors_sequential_is_no_stack_of_blocks():
    from evomerge.space.towers import stack_positions

    # Qwen2-VL: the merger's nn.Sequential numbers Linear, GELU, Linear (mlp.0, mlp.2): bare tensors, a gap
    names = [
        "model.visual.blocks.0.attn.qkv.weight", "model.visual.blocks.1.attn.qkv.weight",
        "model.visual.merger.ln_q.weight", "model.visual.merger.mlp.0.weight", "model.visual.merger.mlp.2.weight",
        "model.language_model.layers.0.mlp.up_proj.weight", "model.language_model.layers.1.mlp.up_proj.weight",
    ]
    assert stack_positions(names) == [
        ("model.visual.blocks", 0), ("model.visual.blocks", 1), None, None, None,
        ("model.language_model.layers", 0), ("model.language_model.layers", 1),
    ]
    labels, groups = group_tensors(names, "per_layer_group", None)
    assert [labels[g] for g in groups[2:5]] == ["visual.blocks.1"] * 3  # after the tower's blocks: its last group
    # a stack of bare modules numbered without a gap (an MLP's layers.N.weight) and a LoRA on some
    # layers only (a gap, but modules with parts) are stacks
    assert stack_positions(["layers.0.weight", "layers.1.weight"]) == [("layers", 0), ("layers", 1)]
    lora = ["m.layers.1.q_proj.lora_A.weight", "m.layers.3.q_proj.lora_A.weight"]
    assert stack_positions(lora) == [("m.layers", 1), ("m.layers", 3)]
