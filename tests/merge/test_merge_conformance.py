"""Properties every registered merge method must have, run through Space + Materializer.

Each test runs once per method in ``MERGE_METHODS`` (and per accepted setup: with or without a
base model), so a newly registered method is checked automatically.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.merge import MERGE_METHODS
from evomerge.space.merge_space import GRANULARITIES, Space

RANDOM_METHODS = {"dare_linear", "dare_ties"}
"""Methods whose result depends on the recipe's seed."""


def test_random_methods_are_registered():
    assert RANDOM_METHODS <= set(MERGE_METHODS)


def _granularities(method) -> list[str]:
    return ["global"] if method.global_only else list(GRANULARITIES)


def _space(setup, granularity: str | None = None, **kw) -> Space:
    method = setup.method
    granularity = granularity or ("global" if method.global_only else "per_model")
    layer_groups = 2 if granularity == "per_layer_group" else None
    return Space.build(method, setup.names, setup.n_models, granularity=granularity, layer_groups=layer_groups, **kw)


def _genome(space: Space, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 0.95, space.dim)


def _merged(setup, recipe, chunk: int | None = None) -> dict[str, torch.Tensor]:
    targets = setup.targets()
    setup.materializer(targets, chunk=chunk).apply(recipe)
    return {n: t.clone() for n, t in targets.items()}


def test_writes_every_element_in_place_and_finite(merge_case, make_setup):
    setup = make_setup(*merge_case)
    for granularity in _granularities(setup.method):
        space = _space(setup, granularity)
        targets = setup.targets(fill=float("nan"))  # any element left unwritten stays NaN
        pointers = {n: t.data_ptr() for n, t in targets.items()}
        materializer = setup.materializer(targets)
        materializer.apply(space.decode(_genome(space)))
        for name, t in targets.items():
            assert t.data_ptr() == pointers[name], f"{name} was replaced, not written in place"
            assert materializer.targets[name].data_ptr() == pointers[name]
            assert torch.isfinite(t).all(), f"{granularity}: {name} has unwritten or non-finite entries"


def test_same_recipe_same_result(merge_case, make_setup):
    setup = make_setup(*merge_case)
    space = _space(setup)
    recipe = space.decode(_genome(space, 1))
    targets = setup.targets()
    materializer = setup.materializer(targets)
    materializer.apply(recipe)
    first = {n: t.clone() for n, t in targets.items()}
    materializer.apply(space.decode(_genome(space, 2)))  # something else in between
    materializer.apply(recipe)
    fresh = _merged(setup, recipe)  # and a materializer with nothing cached
    for name in first:
        assert torch.equal(targets[name], first[name]), name
        assert torch.equal(fresh[name], first[name]), name


def test_seed_matters_only_for_random_methods(merge_case, make_setup):
    setup = make_setup(*merge_case)
    space = _space(setup)
    genome = _genome(space, 3)
    a = _merged(setup, space.decode(genome, seed=1))
    b = _merged(setup, space.decode(genome, seed=2))
    same = all(torch.equal(a[n], b[n]) for n in a)
    assert same == (setup.method.name not in RANDOM_METHODS)
    # decode without a seed derives it from the genome: same genome, same merge
    assert space.decode(genome).seed == space.decode(genome.copy()).seed
    assert space.decode(genome).seed != space.decode(_genome(space, 4)).seed


def test_result_does_not_depend_on_chunk_size(merge_case, make_setup):
    # DARE included: its drop decisions hash (expert key, position), so chunking cannot change them.
    setup = make_setup(*merge_case)
    space = _space(setup)
    recipe = space.decode(_genome(space, 5))
    small = _merged(setup, recipe, chunk=7)  # chunk boundaries fall inside rows
    large = _merged(setup, recipe, chunk=1 << 20)
    for name in small:
        torch.testing.assert_close(small[name], large[name], rtol=1e-5, atol=1e-6, msg=name)


def test_identical_models_merge_to_themselves(merge_case, make_setup):
    setup = make_setup(*merge_case)
    if setup.method.name == "lora_compose":
        pytest.skip("lora_compose sums scaled adapters; it has no fixed point at identical inputs")
    model = setup.base if setup.base is not None else setup.experts[0]
    setup.experts = [dict(model) for _ in range(setup.n_models)]  # every task vector is zero
    space = _space(setup)
    merged = _merged(setup, space.decode(_genome(space, 6)))
    for name in merged:
        torch.testing.assert_close(merged[name], model[name], rtol=1e-5, atol=1e-6, msg=name)


def test_encode_decode_round_trip(merge_case, make_setup):
    setup = make_setup(*merge_case)
    rng = np.random.default_rng(7)
    for granularity in _granularities(setup.method):
        space = _space(setup, granularity)
        wanted = {}
        for gene in space.genes:
            spec = setup.method.param(gene.name)
            n = setup.n_models if spec.per_model and granularity != "global" else 1
            if gene.levels is None:
                value = rng.uniform(gene.low, gene.high, n)
            else:  # an integer gene round-trips its integers
                value = rng.integers(gene.low, gene.high, n, endpoint=True).astype(np.float64)
            wanted[gene.name] = value.tolist() if n > 1 else float(value[0])
        genome = space.encode(wanted)
        assert genome.shape == (space.dim,)
        assert ((genome >= 0) & (genome <= 1)).all()
        recipe = space.decode(genome)
        for param, value in wanted.items():
            expected = value if isinstance(value, list) else [value] * len(recipe.values[param][0])
            for group in recipe.values[param]:
                np.testing.assert_allclose(group, expected, rtol=1e-12, atol=1e-12)


def test_x0_decodes_to_declared_defaults(merge_case, make_setup):
    setup = make_setup(*merge_case)
    space = _space(setup)
    recipe = space.decode(space.x0())
    for spec in setup.method.params:
        for group in recipe.values[spec.name]:
            width = setup.n_models if spec.per_model else 1
            np.testing.assert_allclose(group, [spec.default_for(setup.n_models)] * width, atol=1e-12)
    assert recipe.options == setup.method.default_options()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_agree_with_float32(merge_case, make_setup, dtype):
    # Resident copies take the working model's dtype; the merge must work in it and stay close to
    # the float32 result. bfloat16 keeps ~3 significant digits, so a task vector (expert − base)
    # loses ~4% here and TIES / LoRA trims and sign elections flip a few entries of these tiny
    # tensors: a loose bound, which a wrong formula or dtype mix-up still exceeds by far.
    reference = make_setup(*merge_case)
    other = make_setup(*merge_case, dtype=dtype)
    space = _space(reference)
    recipe = space.decode(_genome(space, 8))
    want, got = _merged(reference, recipe), _merged(other, recipe)
    for name in want:
        assert got[name].dtype == dtype
        error = (got[name].double() - want[name].double()).norm() / want[name].double().norm()
        assert error < (0.1 if dtype == torch.bfloat16 else 1e-5), name
