"""The mergekit YAML names tensors as the checkpoint stores them and adapters as BASE+ADAPTER, and
is not written where mergekit would read either differently."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.merge import MERGE_METHODS
from evomerge.mergekit_recipe import NotExpressible, mergekit_config, model_reference
from evomerge.space.merge_space import Space

NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "lm_head.weight"]


def _recipe(method: str = "linear"):
    space = Space.build(MERGE_METHODS[method], NAMES, 2, granularity="per_layer_group")
    return space.decode(np.linspace(0.1, 0.9, space.dim))  # values that differ between layer groups


def test_filters_name_the_checkpoints_tensors():
    stored = {name: name for name in NAMES}
    document = mergekit_config(_recipe(), MERGE_METHODS["linear"], stored, None, ["a", "b"], "bfloat16")
    assert document["dtype"] == "bfloat16" and [m["model"] for m in document["models"]] == ["a", "b"]
    filters = {entry["filter"] for entry in document["models"][0]["parameters"]["weight"]}
    assert filters == {"model.embed_tokens.weight", "model.layers.0.", "model.layers.1.", "lm_head.weight"}


def test_filters_use_stored_names_where_transformers_renames_on_load():
    # as a Gemma 3 checkpoint: stored language_model.model.X loads as the parameter model.language_model.X
    stored = {name.replace("model.", "language_model.model.", 1) if name.startswith("model.") else name: name for name in NAMES}
    recipe = _recipe()
    document = mergekit_config(recipe, MERGE_METHODS["linear"], stored, None, ["a", "b"], "float32")
    entries = document["models"][0]["parameters"]["weight"]
    assert {e["filter"] for e in entries} == {
        "language_model.model.embed_tokens.weight", "language_model.model.layers.0.", "language_model.model.layers.1.", "lm_head.weight"
    }
    by_filter = {e["filter"]: e["value"] for e in entries}
    assert by_filter["language_model.model.layers.1."] == pytest.approx(recipe.params_for("model.layers.1.mlp.weight")["weight"][0])


@pytest.mark.parametrize(
    "stored, words",
    [
        ({**{n: n for n in NAMES[:3]}, "lm_head.linear.weight": "lm_head.linear.weight"}, "checkpoint's tensor 'lm_head.linear.weight' is not a parameter"),
        ({n: n for n in NAMES[:3]}, "merged parameter 'lm_head.weight' is not stored"),
        ({**{n: n for n in NAMES}, "model.layers.0.mlp.packed": None}, "converts the checkpoint's tensor 'model.layers.0.mlp.packed'"),
    ],
)
def test_tensors_stored_under_other_names_are_not_expressible(stored, words):
    with pytest.raises(NotExpressible, match=words):
        mergekit_config(_recipe(), MERGE_METHODS["linear"], stored, None, ["a", "b"], "float32")


def test_a_filter_inside_another_groups_name_is_not_expressible():
    names = ["a.weight", "b.a.weight"]  # per tensor: the filter 'a.weight' is part of 'b.a.weight'
    space = Space.build(MERGE_METHODS["linear"], names, 2, granularity="per_tensor")
    recipe = space.decode(np.linspace(0.1, 0.9, space.dim))
    with pytest.raises(NotExpressible, match="part of the name 'b.a.weight'"):
        mergekit_config(recipe, MERGE_METHODS["linear"], {n: n for n in names}, None, ["x", "y"], "float32")


def test_adapters_are_base_plus_adapter_and_a_plus_in_a_path_is_refused():
    assert model_reference("/m/adapter", "/m/base", adapter=True) == "/m/base+/m/adapter"
    assert model_reference("/m/expert", "/m/base", adapter=False) == "/m/expert"
    with pytest.raises(NotExpressible, match="'/m/c\\+\\+' has one"):
        model_reference("/m/c++", None, adapter=False)


def test_a_passthrough_names_only_models_mergekit_can_read_and_no_scales():
    from evomerge.mergekit_recipe import passthrough_config
    from evomerge.space.paths import Path

    path = Path(((0, 0), (0, 1), (0, 1)), (1.0, 1.0, 1.0))
    document = passthrough_config(path, ["a", None], "bfloat16")  # source 1 (a run) is not on the path
    assert document["slices"] == [{"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "a", "layer_range": [1, 2]}]}]
    assert document["merge_method"] == "passthrough" and document["dtype"] == "bfloat16"
    with pytest.raises(NotExpressible, match="source '0' is a recorded merge"):
        passthrough_config(path, [None, "b"], "float32")
    with pytest.raises(NotExpressible, match="scales the hidden state"):
        passthrough_config(Path(path.layers, (1.0, 0.5, 1.0)), ["a", "b"], "float32")
    # with the head source b, mergekit must take the embeddings and the head from b: empty slices of it
    headed = passthrough_config(path, ["a", "b"], "float32", head=1)
    assert [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in headed["slices"]] == [
        ("b", [0, 0]), ("a", [0, 2]), ("a", [1, 2]), ("b", [0, 0])
    ]


def test_a_passthrough_is_refused_where_mergekit_would_keep_other_layer_types():
    from evomerge.mergekit_recipe import passthrough_config
    from evomerge.space.paths import Path

    path = Path(((0, 0), (0, 1), (0, 1)), (1.0, 1.0, 1.0))
    full = ["full_attention"] * 3
    assert passthrough_config(path, ["a"], "float32", layer_types=(full, full))["slices"]  # same types: written
    assert passthrough_config(path, ["a"], "float32", layer_types=(None, None))["slices"]  # a config without them
    # a deeper path (transformers refuses to save a config whose layer_types are shorter), or other types
    for head, along in ((full[:2], full), (["sliding_attention", "full_attention", "full_attention"], full)):
        with pytest.raises(NotExpressible, match="keeps the head source's layer_types"):
            passthrough_config(path, ["a"], "float32", layer_types=(head, along))
