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
    document = mergekit_config(_recipe(), MERGE_METHODS["linear"], NAMES, None, ["a", "b"], "bfloat16")
    assert document["dtype"] == "bfloat16" and [m["model"] for m in document["models"]] == ["a", "b"]
    filters = {entry["filter"] for entry in document["models"][0]["parameters"]["weight"]}
    assert filters == {"model.embed_tokens.weight", "model.layers.0.", "model.layers.1.", "lm_head.weight"}


@pytest.mark.parametrize(
    "stored, words",
    [
        ([*NAMES[:3], "lm_head.linear.weight"], "checkpoint's tensor 'lm_head.linear.weight' is not a parameter"),
        (NAMES[:3], "merged parameter 'lm_head.weight' is stored under another name"),
    ],
)
def test_tensors_stored_under_other_names_are_not_expressible(stored, words):
    with pytest.raises(NotExpressible, match=words):
        mergekit_config(_recipe(), MERGE_METHODS["linear"], stored, None, ["a", "b"], "float32")


def test_adapters_are_base_plus_adapter_and_a_plus_in_a_path_is_refused():
    assert model_reference("/m/adapter", "/m/base", adapter=True) == "/m/base+/m/adapter"
    assert model_reference("/m/expert", "/m/base", adapter=False) == "/m/expert"
    with pytest.raises(NotExpressible, match="'/m/c\\+\\+' has one"):
        model_reference("/m/c++", None, adapter=False)
