"""Layer swapping: every group of layers is copied whole from the expert its gene names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.space.merge_space import Space


@pytest.mark.parametrize("with_base", [False, True])
def test_picking_expert_j_everywhere_gives_expert_j(make_setup, with_base):
    setup = make_setup("layer_swap", 3, with_base)
    space = Space.build(setup.method, setup.names, 3, granularity="per_layer_group", layer_groups=2)
    assert [g.levels for g in space.genes] == [3]
    for j in range(3):
        targets = setup.targets()
        setup.materializer(targets).apply(space.decode(space.encode({"expert": float(j)})))
        for name, merged in targets.items():
            torch.testing.assert_close(merged, setup.experts[j][name], rtol=0, atol=1e-6)


def test_each_group_comes_from_its_own_expert(make_setup):
    setup = make_setup("layer_swap", 3, with_base=False)
    space = Space.build(setup.method, setup.names, 3, granularity="per_layer_group", layer_groups=2)
    genome = np.array([0.9, 0.1])  # bins of thirds: group 0 → expert 2, group 1 → expert 0
    recipe = space.decode(genome)
    assert recipe.values["expert"] == [[2.0], [0.0]]
    targets = setup.targets()
    setup.materializer(targets).apply(recipe)
    for name, merged in targets.items():
        expert = 2 if space.tensor_groups[name] == 0 else 0
        assert torch.equal(merged, setup.experts[expert][name]), name


def test_genomes_in_one_bin_decode_and_seed_alike(make_setup):
    setup = make_setup("layer_swap", 3, with_base=False)
    space = Space.build(setup.method, setup.names, 3, granularity="per_layer_group", layer_groups=2)
    a, b = space.decode(np.array([0.40, 0.9])), space.decode(np.array([0.60, 0.7]))
    assert a.values == b.values and a.seed == b.seed
    spec = space.search_spec()
    np.testing.assert_allclose(spec.snap(np.array([0.40, 0.9])), [0.5, 5 / 6])
