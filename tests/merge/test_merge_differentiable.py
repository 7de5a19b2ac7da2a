"""AdaMerging's differentiable merge writes what the in-place materializer writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.space.merge_space import Space


@pytest.mark.parametrize("method, with_base", [("task_arithmetic", True), ("linear", False), ("linear", True)])
def test_differentiable_merge_equals_the_materializer(make_setup, method, with_base):
    from evomerge.workers.entropy_gradient import merged_parameters

    setup = make_setup(method, 3, with_base)
    space = Space.build(setup.method, setup.names, 3, granularity="per_layer_group", layer_groups=2)
    genome = np.random.default_rng(0).uniform(0.1, 0.9, space.dim)
    targets = setup.targets()
    materializer = setup.materializer(targets)
    materializer.apply(space.decode(genome))
    merged = merged_parameters(space, materializer.tensors, torch.tensor(genome))
    for name in targets:
        torch.testing.assert_close(merged[name].float(), targets[name], rtol=1e-5, atol=1e-6)
