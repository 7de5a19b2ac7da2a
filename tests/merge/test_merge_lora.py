"""Evo-Merging's LoRA composition: A = Σ β_i·S_α_i(A_i), B = Σ β_i·B_i."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.merge import MERGE_METHODS
from evomerge.merge.resident import ResidentTensor
from evomerge.space.merge_space import Space

A_NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def keep_top(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """S_α: keep the ⌈α·n⌉ entries of largest magnitude."""
    k = math.ceil(alpha * x.numel())
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[x.reshape(-1).abs().topk(k).indices] = True
    return x * mask.view_as(x)


def compose(make_ctx, name, factors, alpha, beta) -> torch.Tensor:
    tensor = ResidentTensor(name, torch.stack(factors))
    out = torch.full_like(factors[0], float("nan"))
    MERGE_METHODS["lora_compose"].kernel(out, tensor, {"alpha": alpha, "beta": beta}, {}, make_ctx(tensor, chunk=9))
    return out


def test_lora_a_is_sparsified_by_magnitude_and_scaled_by_signed_beta(make_ctx):
    a = [randn(8, 16, seed=i) for i in range(3)]
    alpha, beta = [0.25, 0.6, 1.0], [0.5, -1.2, 0.3]
    out = compose(make_ctx, A_NAME, a, alpha, beta)
    expected = sum(b * keep_top(x, al) for x, al, b in zip(a, alpha, beta))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_lora_sparsification_keeps_ceil_alpha_n(make_ctx):
    a = randn(7, 11, seed=3)  # 77 entries; α = 0.1 keeps ⌈7.7⌉ = 8 (TIES' int() would keep 7)
    out = compose(make_ctx, A_NAME, [a], [0.1], [1.0])
    kept = (out != 0).reshape(-1)
    assert int(kept.sum()) == 8
    assert set(kept.nonzero().view(-1).tolist()) == set(a.reshape(-1).abs().topk(8).indices.tolist())
    assert torch.equal(compose(make_ctx, A_NAME, [a], [0.0], [1.0]), torch.zeros_like(a))  # α = 0: nothing


def test_lora_b_is_never_sparsified(make_ctx):
    b = [randn(16, 8, seed=10 + i) for i in range(2)]
    out = compose(make_ctx, B_NAME, b, [0.1, 0.2], [0.7, -0.4])
    torch.testing.assert_close(out, 0.7 * b[0] - 0.4 * b[1], rtol=1e-5, atol=1e-6)


def test_lora_compose_rejects_non_lora_tensors(make_ctx):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*lora_A"):
        compose(make_ctx, "model.layers.0.mlp.up_proj.weight", [randn(4, 4, seed=1)], [1.0], [1.0])


def test_lora_compose_rejects_a_base_model(make_ctx):
    x = randn(4, 4, seed=1)
    tensor = ResidentTensor(A_NAME, torch.stack([x]), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="base"):
        MERGE_METHODS["lora_compose"].kernel(torch.empty(4, 4), tensor, {"alpha": [1.0], "beta": [1.0]}, {}, make_ctx(tensor))


def test_lora_compose_through_space_and_materializer(make_setup):
    setup = make_setup("lora_compose", 3, False)
    space = Space.build(setup.method, setup.names, 3, granularity="per_model")
    alpha, beta = [0.3, 0.75, 1.0], [1.0, -0.5, 0.25]
    targets = setup.targets()
    setup.materializer(targets).apply(space.decode(space.encode({"alpha": alpha, "beta": beta})))
    for name in setup.names:
        factors = [e[name] for e in setup.experts]
        if "lora_A" in name:
            expected = sum(b * keep_top(x, al) for x, al, b in zip(factors, alpha, beta))
        else:
            expected = sum(b * x for x, b in zip(factors, beta))
        torch.testing.assert_close(targets[name], expected, rtol=1e-5, atol=1e-5, msg=name)


def test_lora_compose_default_is_the_uniform_dense_average(make_setup):
    # the paper's stage-1 start: β = 1/N, nothing pruned (α = 1)
    setup = make_setup("lora_compose", 2, False)
    space = Space.build(setup.method, setup.names, 2)
    targets = setup.targets()
    setup.materializer(targets).apply(space.decode(space.x0()))
    for name in setup.names:
        torch.testing.assert_close(targets[name], (setup.experts[0][name] + setup.experts[1][name]) / 2)


def test_lora_compose_on_a_full_model_fails_naming_the_tensor(make_setup):
    setup = make_setup("linear", 2, False)  # a Llama-like layout, not an adapter
    space = Space.build(MERGE_METHODS["lora_compose"], setup.names, 2)
    with pytest.raises(ValueError, match="embed_tokens"):
        setup.materializer().apply(space.decode(np.full(space.dim, 0.5)))
