"""The materializer on whole tiny Llama models saved and loaded with transformers, and its checks."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from evomerge.errors import ModelMismatchError
from evomerge.merge import MERGE_METHODS
from evomerge.workers.materializer import Materializer
from evomerge.space.merge_space import Space

INPUT_IDS = (torch.arange(16).view(2, 8) * 7) % 128


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=INPUT_IDS).logits


@pytest.fixture(scope="module")
def llamas(load_llama):
    """State dicts (detached copies) and reference logits of the saved base and experts."""
    out = {}
    for key in ("base", "expert0", "expert1"):
        model = load_llama(key)
        out[key] = {
            "state": {n: t.detach().clone() for n, t in model.state_dict().items()},
            "logits": logits(model),
        }
    return out


def build(working, llamas, experts=("expert0", "expert1"), base: str | None = "base") -> Materializer:
    return Materializer.from_state_dicts(
        dict(working.named_parameters()),
        ((key, llamas[key]["state"]) for key in experts),
        n_models=len(experts),
        base=None if base is None else llamas[base]["state"],
    )


def test_tiny_models_really_differ(llamas):
    assert not torch.allclose(llamas["expert0"]["logits"], llamas["expert1"]["logits"])
    assert not torch.allclose(llamas["base"]["logits"], llamas["expert0"]["logits"])


@pytest.mark.parametrize("base", [None, "base"])
def test_linear_one_hot_reproduces_each_experts_logits(load_llama, llamas, base):
    working = load_llama("base")
    materializer = build(working, llamas, base=base)
    space = Space.build(MERGE_METHODS["linear"], list(materializer.targets), 2)
    for i, key in enumerate(("expert0", "expert1")):
        weights = [1.0 if j == i else 0.0 for j in range(2)]
        materializer.apply(space.decode(space.encode({"weight": weights})))
        for name, p in working.named_parameters():
            torch.testing.assert_close(p.detach(), llamas[key]["state"][name], rtol=0, atol=1e-6)
        torch.testing.assert_close(logits(working), llamas[key]["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in MERGE_METHODS if m != "lora_compose"])
def test_every_method_yields_a_working_model(load_llama, llamas, method):
    working = load_llama("base")
    before = {n: p.data_ptr() for n, p in working.named_parameters()}
    materializer = build(working, llamas)
    spec = MERGE_METHODS[method]
    if spec.needs_fisher:  # a worker estimates these on each expert's data
        materializer.set_fishers({n: torch.rand_like(t.stack) for n, t in materializer.tensors.items()}, floor=1e-8)
    space = Space.build(spec, list(materializer.targets), 2, granularity="global" if spec.global_only else "per_layer_group", layer_groups=None if spec.global_only else 2)
    materializer.apply(space.decode(np.random.default_rng(0).uniform(0.1, 0.9, space.dim)))
    assert {n: p.data_ptr() for n, p in working.named_parameters()} == before  # written in place
    out = logits(working)
    assert out.shape == (2, 8, 128)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, llamas["base"]["logits"])  # the merge changed the model


def test_task_arithmetic_with_zero_lambda_is_the_base(load_llama, llamas):
    working = load_llama("expert1")
    materializer = build(working, llamas)
    space = Space.build(MERGE_METHODS["task_arithmetic"], list(materializer.targets), 2, fixed={"lambda": 0.0})
    materializer.apply(space.decode(np.full(space.dim, 0.7)))
    torch.testing.assert_close(logits(working), llamas["base"]["logits"], rtol=1e-5, atol=1e-5)


def test_working_model_may_be_the_base_itself(load_llama, llamas):
    # targets and base share storage here; writing merges must not corrupt the resident base
    working = load_llama("base")
    params = dict(working.named_parameters())
    materializer = Materializer.from_state_dicts(
        params, ((k, llamas[k]["state"]) for k in ("expert0", "expert1")), n_models=2, base=working.state_dict()
    )
    space = Space.build(MERGE_METHODS["task_arithmetic"], list(params), 2, granularity="per_model")
    materializer.apply(space.decode(space.encode({"weight": [1.0, 0.0], "lambda": 1.0})))
    torch.testing.assert_close(logits(working), llamas["expert0"]["logits"], rtol=1e-5, atol=1e-5)
    materializer.apply(space.decode(space.encode({"weight": [1.0, 1.0], "lambda": 0.0})))
    torch.testing.assert_close(logits(working), llamas["base"]["logits"], rtol=1e-5, atol=1e-5)


def test_working_model_may_be_an_expert_itself(load_llama, llamas):
    working = load_llama("expert0")
    materializer = Materializer.from_state_dicts(
        dict(working.named_parameters()),
        [("expert0", working.state_dict()), ("expert1", llamas["expert1"]["state"])],
        n_models=2,
    )
    space = Space.build(MERGE_METHODS["linear"], list(materializer.targets), 2)
    materializer.apply(space.decode(space.encode({"weight": [0.0, 1.0]})))
    torch.testing.assert_close(logits(working), llamas["expert1"]["logits"], rtol=1e-5, atol=1e-5)
    materializer.apply(space.decode(space.encode({"weight": [1.0, 0.0]})))
    torch.testing.assert_close(logits(working), llamas["expert0"]["logits"], rtol=1e-5, atol=1e-5)


def test_lora_compose_refuses_a_full_model(load_llama, llamas):
    working = load_llama("base")
    materializer = build(working, llamas, base=None)
    space = Space.build(MERGE_METHODS["lora_compose"], list(materializer.targets), 2)
    with pytest.raises(ValueError, match="embed_tokens.*lora_A"):
        materializer.apply(space.decode(space.x0()))


# --- mismatches --------------------------------------------------------------------------------------


@pytest.mark.parametrize("odd, tensor", [("vocab130", "embed_tokens"), ("ffn48", "gate_proj")])
def test_mismatched_expert_is_refused_naming_the_tensor(load_llama, llamas, odd, tensor):
    working = load_llama("base")
    state = load_llama(odd).state_dict()
    for base in (llamas["base"]["state"], None):
        with pytest.raises(ModelMismatchError, match=tensor) as info:
            Materializer.from_state_dicts(
                dict(working.named_parameters()),
                [("expert0", llamas["expert0"]["state"]), (odd, state)],
                n_models=2,
                base=base,
            )
        assert odd in str(info.value)  # and the model it comes from
    if odd == "vocab130":
        assert "vocabularies differ" in str(info.value)


def test_mismatched_base_is_refused(load_llama, llamas):
    working = load_llama("base")
    with pytest.raises(ModelMismatchError, match="base model.*embed_tokens"):
        Materializer.from_state_dicts(
            dict(working.named_parameters()),
            [("expert0", llamas["expert0"]["state"])],
            n_models=1,
            base=load_llama("vocab130").state_dict(),
        )


def test_missing_and_extra_tensors_are_named(make_setup):
    setup = make_setup("linear", 2, False)
    missing = {n: t for n, t in setup.experts[1].items() if n != "lm_head.weight"}
    with pytest.raises(ModelMismatchError, match="lacks lm_head.weight"):
        Materializer.from_state_dicts(setup.targets(), [("a", setup.experts[0]), ("b", missing)], n_models=2)
    extra = {**setup.experts[1], "model.layers.9.extra.weight": torch.zeros(2)}
    with pytest.raises(ModelMismatchError, match=r"has extra model\.layers\.9\.extra\.weight"):
        Materializer.from_state_dicts(setup.targets(), [("a", setup.experts[0]), ("b", extra)], n_models=2)


def test_expert_count_must_match(make_setup):
    setup = make_setup("linear", 2, False)
    with pytest.raises(ValueError, match="expected 3 experts, got 2"):
        Materializer.from_state_dicts(setup.targets(), enumerate(setup.experts), n_models=3)
    with pytest.raises(ValueError, match="more than the announced 1"):
        Materializer.from_state_dicts(setup.targets(), enumerate(setup.experts), n_models=1)


def test_loading_holds_one_expert_at_a_time(make_setup):
    # a worker's experts stream in one by one (on a GPU each is built on the device): when the
    # next one loads, nothing may still hold the last, or the load peaks at two experts, not one
    setup = make_setup("linear", 3, False)
    loaded: list[weakref.ref] = []

    def experts():
        for i, expert in enumerate(setup.experts):
            assert all(ref() is None for ref in loaded), f"expert {i - 1} is still held while expert {i} loads"
            state = {n: t.clone() for n, t in expert.items()}
            loaded.append(weakref.ref(state["lm_head.weight"]))
            yield f"expert {i}", state
            del state

    Materializer.from_state_dicts(setup.targets(), experts(), n_models=3)
    assert len(loaded) == 3


def test_method_requirements_are_checked(make_setup):
    no_base = make_setup("linear", 3, False)
    materializer = no_base.materializer()
    with pytest.raises(ValueError, match="'ties' needs a base model"):
        materializer.check_method(MERGE_METHODS["ties"])
    with pytest.raises(ValueError, match="'slerp' takes exactly 2 experts, got 3"):
        materializer.check_method(MERGE_METHODS["slerp"])
    space = Space.build(MERGE_METHODS["task_arithmetic"], no_base.names, 3)
    with pytest.raises(ValueError, match="needs a base model"):
        materializer.apply(space.decode(space.x0()))
    materializer.check_method(MERGE_METHODS["linear"])  # fine


def test_dare_masks_differ_between_tensors(make_setup):
    # two same-shaped tensors with identical task vectors get independent masks (seeded per tensor)
    setup = make_setup("dare_linear", 1, True)
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    setup.base[b] = setup.base[a].clone()
    setup.experts[0][b] = setup.experts[0][a].clone()
    space = Space.build(setup.method, setup.names, 1, fixed={"density": 0.5})
    targets = setup.targets()
    setup.materializer(targets).apply(space.decode(np.full(space.dim, 0.5), seed=17))
    assert not torch.equal(targets[a], targets[b])


# --- M2N2 seed recipes: per-block Gram matrices and piecewise combinations ------------------

SEED_SHAPES = {"w": (3, 4), "b": (4,), "t": (2, 3, 2), "s": ()}


def _seed_setup(with_base: bool, dtype=torch.float64, tier: str = "device", folder=None):
    """Three experts (and a base) of ``SEED_SHAPES``; a streaming tier reads them two elements at a
    time (a tiny chunk and block share), the mmap tier from files written to ``folder``."""
    from safetensors.torch import save_file

    from evomerge.workers.tiers import TIER_CLASSES, MappedTier

    gen = torch.Generator().manual_seed(5)
    experts = [{n: torch.randn(s, generator=gen, dtype=dtype) for n, s in SEED_SHAPES.items()} for _ in range(3)]
    base = {n: torch.randn(s, generator=gen, dtype=dtype) for n, s in SEED_SHAPES.items()} if with_base else None
    targets = {n: torch.empty(s, dtype=dtype) for n, s in SEED_SHAPES.items()}
    if TIER_CLASSES[tier].maps_files:
        def saved(label, state):
            save_file(state, str(folder / f"{label}.safetensors"))
            return label, [folder / f"{label}.safetensors"]

        mapped = MappedTier(targets, [saved(f"e{i}", e) for i, e in enumerate(experts)], base and saved("base", base))
        mat = Materializer(targets, mapped, chunk=2, stream_share=1e-6)
    else:
        mat = Materializer.from_state_dicts(
            targets, ((f"e{i}", e) for i, e in enumerate(experts)), 3, base=base,
            chunk=2, tier=TIER_CLASSES[tier], stream_share=1e-6,
        )
    flat = np.stack([np.concatenate([e[n].reshape(-1).numpy() for n in SEED_SHAPES]) for e in experts])
    return mat, targets, flat


@pytest.mark.parametrize("tier", ["device", "host", "mmap"])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("grid", ["rows", "elements"])
def test_block_grams_and_pieces_match_the_flat_experts(with_base, grid, tier, tmp_path):
    from evomerge.space.seed_recipes import PiecewiseRecipe, SeedGram, SeedRecipe

    mat, targets, flat = _seed_setup(with_base, tier=tier, folder=tmp_path)
    edges, grams = mat.block_grams(grid)
    if grid == "rows":  # rows of the matrix, the vector and the scalar whole, rows of the 3-D tensor
        assert edges.tolist() == [0, 4, 8, 12, 16, 22, 28, 29]
    gram = SeedGram.from_block_grams(edges, grams)
    np.testing.assert_allclose(gram.prefix, SeedGram.from_flat(flat, edges).prefix, rtol=1e-12)
    recipe = SeedRecipe(np.array([0, 1, 3, gram.n_blocks]), np.array([[1.0, 0, 0], [0.2, -0.5, 1.1], [0, 0.5, 0.5]]))
    mat.apply(PiecewiseRecipe(gram.block_edges[recipe.edges], recipe.coeffs))  # after the Gram: resident rows untouched
    got = np.concatenate([targets[n].reshape(-1).numpy() for n in SEED_SHAPES])
    np.testing.assert_allclose(got, gram.materialize(recipe, flat), rtol=1e-12, atol=1e-12)


def test_pieces_must_cover_the_model(monkeypatch):
    import evomerge.space.seed_recipes as seed_recipes
    from evomerge.space.seed_recipes import PiecewiseRecipe

    mat, _, _ = _seed_setup(False)
    with pytest.raises(ValueError, match="cover"):
        mat.apply(PiecewiseRecipe(np.array([0, 10]), np.ones((1, 3))))
    with pytest.raises(ValueError, match="split grid"):
        mat.block_edges("columns")
    monkeypatch.setattr(seed_recipes, "ELEMENT_GRID_LIMIT", 10)
    with pytest.raises(ValueError, match="rows"):
        mat.block_edges("elements")


def test_the_mmap_tier_refuses_a_checkpoint_without_a_parameter(tmp_path):
    from safetensors.torch import save_file

    from evomerge.workers.tiers import MappedTier

    targets = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(ModelMismatchError, match="expert 'e' stores no tensor named b .*models.residency host"):
        MappedTier(targets, [("expert 'e'", [tmp_path / "e.safetensors"])])
