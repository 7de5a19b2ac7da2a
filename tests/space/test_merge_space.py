"""Search spaces: genome size per granularity, tensor grouping, decoding, encoding, and errors."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.merge import MERGE_METHODS
from evomerge.space.merge_space import GRANULARITIES, Space, genome_seed, group_tensors, layer_index

# Same order as a Llama's named_parameters(): embedding, four layers, final norm, head.
NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.2.mlp.up_proj.weight",
    "model.layers.3.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]
LINEAR, TIES, SLERP = MERGE_METHODS["linear"], MERGE_METHODS["ties"], MERGE_METHODS["slerp"]


def test_layer_index():
    assert layer_index("model.layers.7.mlp.up_proj.weight") == 7
    assert layer_index("model.layers.12.self_attn.q_proj.lora_A.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert layer_index("model.layers7.weight") is None  # a number glued to a word is not a layer index


def _expected_dim(method, granularity: str, n_models: int, n_groups: int) -> int:
    per_model = sum(p.per_model for p in method.params)
    shared = len(method.params) - per_model
    if granularity == "global":
        return len(method.params)
    return n_groups * (per_model * n_models + shared)


@pytest.mark.parametrize("method", [LINEAR, TIES, SLERP], ids=lambda m: m.name)
@pytest.mark.parametrize(
    "granularity, layer_groups, n_groups",
    [("global", None, 1), ("per_model", None, 1), ("per_layer_group", 2, 2), ("per_layer_group", None, 4), ("per_tensor", None, len(NAMES))],
)
def test_dimension_per_granularity(method, granularity, layer_groups, n_groups):
    n_models = 2 if method is SLERP else 3
    space = Space.build(method, NAMES, n_models, granularity=granularity, layer_groups=layer_groups)
    assert space.dim == _expected_dim(method, granularity, n_models, n_groups)
    assert len(space.group_names) == n_groups
    assert space.x0().shape == (space.dim,)


def test_concrete_dimensions():
    # written out once by hand: TIES has weight and density per model and one lambda per group
    assert Space.build(TIES, NAMES, 3, granularity="global").dim == 3
    assert Space.build(TIES, NAMES, 3, granularity="per_model").dim == 3 + 3 + 1
    assert Space.build(TIES, NAMES, 3, granularity="per_layer_group", layer_groups=2).dim == 2 * 7
    assert Space.build(TIES, NAMES, 3, granularity="per_tensor").dim == 9 * 7
    assert Space.build(LINEAR, NAMES, 3, granularity="per_layer_group", layer_groups=2).dim == 6


def test_layer_groups_and_non_layer_tensors():
    names, groups = group_tensors(NAMES, "per_layer_group", 2)
    assert names == ["layers 0-1", "layers 2-3"]
    assert dict(zip(NAMES, groups)) == {
        "model.embed_tokens.weight": 0,  # before the layers: first group
        "model.layers.0.self_attn.q_proj.weight": 0,
        "model.layers.0.input_layernorm.weight": 0,
        "model.layers.1.self_attn.q_proj.weight": 0,
        "model.layers.1.input_layernorm.weight": 0,
        "model.layers.2.mlp.up_proj.weight": 1,
        "model.layers.3.mlp.up_proj.weight": 1,
        "model.norm.weight": 1,  # after the layers: last group
        "lm_head.weight": 1,
    }
    names, groups = group_tensors(NAMES, "per_layer_group", 3)  # 4 layers in 3 contiguous groups
    assert len(names) == 3
    layer_groups = [g for n, g in zip(NAMES, groups) if layer_index(n) is not None]
    assert layer_groups == sorted(layer_groups) and set(layer_groups) == {0, 1, 2}
    assert groups[0] == 0 and groups[-2:] == [2, 2]
    names, groups = group_tensors(NAMES, "per_layer_group", None)  # default: one group per layer
    assert names == ["layer 0", "layer 1", "layer 2", "layer 3"]
    assert groups == [0, 0, 0, 1, 1, 2, 3, 3, 3]
    assert group_tensors(NAMES, "per_tensor", None) == (NAMES, list(range(len(NAMES))))
    for granularity in ("global", "per_model"):
        assert group_tensors(NAMES, granularity, None)[1] == [0] * len(NAMES)


def test_recipe_gives_each_tensor_its_groups_values():
    space = Space.build(LINEAR, NAMES, 2, granularity="per_layer_group", layer_groups=2)
    # genes: group 0 → (0.1, 0.2), group 1 → (0.7, 0.8)
    recipe = space.decode(np.array([0.1, 0.2, 0.7, 0.8]))
    assert recipe.params_for("model.embed_tokens.weight")["weight"] == pytest.approx([0.1, 0.2])
    assert recipe.params_for("model.layers.1.input_layernorm.weight")["weight"] == pytest.approx([0.1, 0.2])
    assert recipe.params_for("model.layers.2.mlp.up_proj.weight")["weight"] == pytest.approx([0.7, 0.8])
    assert recipe.params_for("lm_head.weight")["weight"] == pytest.approx([0.7, 0.8])
    tensor_space = Space.build(TIES, NAMES, 2, granularity="per_tensor", fixed={"density": 0.4})
    genome = np.random.default_rng(0).uniform(size=tensor_space.dim)
    recipe = tensor_space.decode(genome)
    for i, name in enumerate(NAMES):
        params = recipe.params_for(name)
        lo, hi = TIES.param("weight").low, TIES.param("weight").high
        # blocks are laid out parameter by parameter, group by group, expert by expert
        assert params["weight"] == pytest.approx(list(lo + genome[2 * i : 2 * i + 2] * (hi - lo)))
        assert params["density"] == [0.4, 0.4]
        lam = TIES.param("lambda")
        assert params["lambda"] == pytest.approx(lam.low + genome[2 * len(NAMES) + i] * (lam.high - lam.low))


def test_decode_maps_the_unit_cube_onto_bounds_and_clips():
    space = Space.build(LINEAR, NAMES, 3, granularity="per_model", bounds={"weight": (0.2, 0.8)})
    recipe = space.decode(np.array([0.0, 0.25, 1.0]))
    assert recipe.values["weight"] == [pytest.approx([0.2, 0.35, 0.8])]
    clipped = space.decode(np.array([-3.0, 0.5, 7.0]))
    assert clipped.values["weight"] == [pytest.approx([0.2, 0.5, 0.8])]


def test_global_per_model_parameter_is_shared_by_every_expert():
    space = Space.build(TIES, NAMES, 3, granularity="global")
    recipe = space.decode(np.array([0.5, 0.5, 0.5]))
    w, d, lam = TIES.param("weight"), TIES.param("density"), TIES.param("lambda")
    assert recipe.values["weight"] == [[pytest.approx((w.low + w.high) / 2)] * 3]
    assert recipe.values["density"] == [[pytest.approx((d.low + d.high) / 2)] * 3]
    assert recipe.values["lambda"] == [[pytest.approx((lam.low + lam.high) / 2)]]


def test_fixed_and_searched_parameters():
    space = Space.build(TIES, NAMES, 2, granularity="per_model", fixed={"lambda": 1.3})
    assert [g.name for g in space.genes] == ["weight", "density"]
    assert space.dim == 4
    recipe = space.decode(np.full(4, 0.5))
    assert recipe.values["lambda"] == [[1.3]]
    only_weight = Space.build(TIES, NAMES, 2, search=["weight"])
    recipe = only_weight.decode(np.full(only_weight.dim, 0.5))
    assert only_weight.dim == 2
    assert recipe.values["density"] == [[TIES.param("density").default] * 2]
    assert recipe.values["lambda"] == [[TIES.param("lambda").default]]


def test_narrowed_bounds_move_the_default_start_inside_them():
    # linear's declared default weight is 1.0; a configured range [0.2, 0.8] must still build
    space = Space.build(LINEAR, NAMES, 2, bounds={"weight": (0.2, 0.8)})
    np.testing.assert_allclose(space.x0(), [1.0, 1.0])
    space = Space.build(TIES, NAMES, 2, bounds={"density": (0.6, 1.0)})  # default density 0.5
    assert space.decode(space.x0()).values["density"] == [pytest.approx([0.6, 0.6])]


def test_x0_follows_init_and_defaults():
    space = Space.build(LINEAR, NAMES, 4, bounds={"weight": (0.0, 2.0)}, init={"weight": 0.5})
    np.testing.assert_allclose(space.x0(), [0.25] * 4)
    space = Space.build(MERGE_METHODS["lora_compose"], NAMES, 4)  # beta defaults to 1/N in [-1.5, 1.5]
    assert space.init["beta"] == pytest.approx(0.25)
    recipe = space.decode(space.x0())
    assert recipe.values["beta"] == [pytest.approx([0.25] * 4)]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_encode_decode_round_trip(granularity):
    space = Space.build(TIES, NAMES, 3, granularity=granularity, layer_groups=2, bounds={"lambda": (0.5, 1.5)})
    values = {"weight": [0.3, 1.1, 1.9], "density": [0.2, 0.5, 0.95], "lambda": 0.75}
    if granularity == "global":
        values = {"weight": 0.6, "density": 0.3, "lambda": 0.75}
    genome = space.encode(values)
    assert genome.shape == (space.dim,)
    recipe = space.decode(genome)
    for param, value in values.items():
        width = 1 if param == "lambda" else 3
        want = value if isinstance(value, list) else [value] * width
        for group in recipe.values[param]:
            np.testing.assert_allclose(group, want, rtol=1e-12)


def test_genome_seed_is_stable_and_distinguishes_genomes():
    g = np.array([0.1, 0.2, 0.3])
    assert genome_seed(g) == genome_seed(g.copy()) == genome_seed(list(g))
    assert genome_seed(g) != genome_seed(np.array([0.1, 0.2, 0.30000001]))
    assert 0 <= genome_seed(g) < 2**63


def test_unknown_parameter_names_are_rejected():
    for kwargs in ({"fixed": {"wieght": 1.0}}, {"bounds": {"wieght": (0, 1)}}, {"init": {"wieght": 0.5}}, {"search": ["wieght"]}):
        with pytest.raises(ValueError, match="wieght.*weight"):
            Space.build(LINEAR, NAMES, 2, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bounds": {"weight": (0.5, 0.5)}}, "low < high"),
        ({"bounds": {"weight": (1.0, 0.0)}}, "low < high"),
        ({"init": {"weight": 1.5}}, "outside its bounds"),
        ({"bounds": {"weight": (0.1, 0.4)}, "init": {"weight": 0.5}}, "outside its bounds"),
        ({"search": ["weight"], "fixed": {"weight": 0.5}}, "both searched and fixed"),
        ({"options": {"normalise": True}}, "no option 'normalise'"),
        ({"granularity": "per_layer"}, "granularity must be one of"),
        ({"granularity": "per_layer_group", "layer_groups": 5}, "between 1 and the model's 4 layers"),
        ({"granularity": "per_layer_group", "layer_groups": 0}, "between 1"),
    ],
)
def test_invalid_spaces_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Space.build(LINEAR, NAMES, 2, **kwargs)


def test_per_layer_group_needs_numbered_layers():
    with pytest.raises(ValueError, match="no numbered layers"):
        Space.build(LINEAR, ["embed.weight", "head.weight"], 2, granularity="per_layer_group")


@pytest.mark.parametrize("granularity", ["per_model", "per_layer_group", "per_tensor"])
def test_split_slerp_is_global_only(granularity):
    with pytest.raises(ValueError, match="only supports granularity 'global'"):
        Space.build(MERGE_METHODS["split_slerp"], NAMES, 2, granularity=granularity, layer_groups=2)
    assert Space.build(MERGE_METHODS["split_slerp"], NAMES, 2, granularity="global").dim == 2


def test_decode_rejects_a_genome_of_the_wrong_size():
    space = Space.build(LINEAR, NAMES, 3)
    with pytest.raises(ValueError, match=r"expects \(3,\)"):
        space.decode(np.zeros(4))


def test_options_are_resolved_from_defaults_and_config():
    assert Space.build(TIES, NAMES, 2).options == {"normalize": True}
    assert Space.build(TIES, NAMES, 2, options={"normalize": False}).decode(np.full(5, 0.5)).options == {"normalize": False}
    assert Space.build(MERGE_METHODS["dare_ties"], NAMES, 2).options == {"normalize": False, "rescale": True}


def test_genomes_that_clip_to_the_same_point_merge_identically():
    space = Space.build(LINEAR, NAMES, 3, granularity="per_model")
    inside = space.decode(np.array([0.0, 0.5, 1.0]))
    outside = space.decode(np.array([-2.0, 0.5, 3.0]))
    assert inside.seed == outside.seed
    assert inside.values == outside.values


def test_encode_names_the_parameter_when_given_the_wrong_number_of_values():
    space = Space.build(TIES, NAMES, 3, granularity="global")
    with pytest.raises(ValueError, match="'weight' takes one value or 1"):
        space.encode({"weight": [0.1, 0.2, 0.3]})
