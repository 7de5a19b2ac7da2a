"""Linear, task arithmetic, TIES and DARE kernels against their definitions, written out plainly."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import MERGE_METHODS
from evomerge.merge.resident import ResidentTensor


def resident(experts: list[torch.Tensor], base: torch.Tensor | None = None, name: str = "w") -> ResidentTensor:
    if base is None:
        return ResidentTensor(name, torch.stack(experts).contiguous())
    return ResidentTensor(name, torch.stack([e - base for e in experts]).contiguous(), base.clone())


def run(method: str, tensor: ResidentTensor, ctx, options: dict | None = None, **params) -> torch.Tensor:
    spec = MERGE_METHODS[method]
    out = torch.full(tuple(tensor.shape), float("nan"), dtype=tensor.stack.dtype)
    spec.kernel(out, tensor, params, {**spec.default_options(), **(options or {})}, ctx)
    return out


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- naive references ------------------------------------------------------------------------------


def trim_top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the k = int(density·n) entries of largest magnitude, zero the rest."""
    if density >= 1.0:
        return tau.clone()
    k = int(density * tau.numel())
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[tau.reshape(-1).abs().topk(k).indices] = True
    return tau * keep.view_as(tau)


def ties_reference(base, experts, weights, densities, lam=1.0, normalize=True) -> torch.Tensor:
    """TIES-Merging as the paper and mergekit define it, on whole tensors."""
    weighted = torch.stack([w * trim_top_k(e - base, d) for e, w, d in zip(experts, weights, densities)])
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)  # sign of the weighted sum; 0 counts as +
    agree = torch.sign(weighted) == elected  # zeroed (trimmed) entries agree with nothing
    merged = (weighted * agree).sum(dim=0)
    if normalize:  # disjoint mean: divide by the summed weights of the agreeing experts
        w = torch.tensor(weights).view(-1, *([1] * base.dim()))
        divisor = (w * agree).sum(dim=0)
        merged = torch.where(divisor != 0, merged / torch.where(divisor != 0, divisor, 1.0), merged)
    return base + lam * merged


# --- linear ------------------------------------------------------------------------------------------


def test_linear_normalized_and_unnormalized(make_ctx):
    a, b, c = randn(5, 7, seed=1), randn(5, 7, seed=2), randn(5, 7, seed=3)
    t = resident([a, b, c])
    weights = [0.5, 0.25, 0.25]  # sum 1: normalisation changes nothing
    torch.testing.assert_close(run("linear", t, make_ctx(t), weight=weights), 0.5 * a + 0.25 * b + 0.25 * c)
    weights = [2.0, 1.0, 1.0]  # sum 4
    torch.testing.assert_close(run("linear", t, make_ctx(t), weight=weights), (2 * a + b + c) / 4)
    torch.testing.assert_close(
        run("linear", t, make_ctx(t), options={"normalize": False}, weight=weights), 2 * a + b + c
    )


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_one_hot_weights_reproduce_an_expert(make_ctx, with_base, normalize):
    experts = [randn(4, 9, seed=i) for i in range(3)]
    base = randn(4, 9, seed=10) if with_base else None
    t = resident(experts, base)
    for i in range(3):
        weights = [0.0] * 3
        weights[i] = 1.0
        out = run("linear", t, make_ctx(t), options={"normalize": normalize}, weight=weights)
        torch.testing.assert_close(out, experts[i], rtol=0, atol=1e-6)
    if normalize:  # any positive multiple of a one-hot vector, too
        out = run("linear", t, make_ctx(t), weight=[0.0, 0.3, 0.0])
        torch.testing.assert_close(out, experts[1], rtol=0, atol=1e-6)


def test_linear_with_base_equals_linear_without(make_ctx):
    experts = [randn(6, 6, seed=i) for i in range(3)]
    base = randn(6, 6, seed=9)
    weights = [0.7, -0.2, 0.4]
    no_base, with_base = resident(experts), resident(experts, base)
    expected = sum(w * e for w, e in zip(weights, experts))
    for t in (no_base, with_base):
        out = run("linear", t, make_ctx(t, chunk=5), options={"normalize": False}, weight=weights)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# --- task arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_is_base_plus_lambda_weighted_task_vectors(make_ctx, normalize):
    base = randn(8, 5, seed=0)
    experts = [base + 0.1 * randn(8, 5, seed=i) for i in (1, 2, 3)]
    weights, lam = [0.3, 1.2, 0.6], 0.8
    t = resident(experts, base)
    out = run("task_arithmetic", t, make_ctx(t, chunk=6), options={"normalize": normalize}, weight=weights, **{"lambda": lam})
    combined = sum(w * (e - base) for w, e in zip(weights, experts))
    if normalize:
        combined = combined / sum(weights)
    torch.testing.assert_close(out, base + lam * combined, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_needs_a_base(make_ctx):
    t = resident([randn(3, seed=1), randn(3, seed=2)])
    with pytest.raises(ValueError, match="base"):
        run("task_arithmetic", t, make_ctx(t), weight=[1.0, 1.0], **{"lambda": 1.0})


# --- TIES --------------------------------------------------------------------------------------------


def test_ties_hand_computed_example(make_ctx):
    # base = 1 everywhere; task vectors τ1, τ2, τ3; weights (1, 1, 0.5); density 0.5 → k = int(0.5·4) = 2.
    #   τ1 = [ 3, -1,  0.5, -2]  → trimmed [3,  0,  0, -2]   (top-2 magnitudes: 3, 2)
    #   τ2 = [-1, -4,  2,    1]  → trimmed [0, -4,  2,  0]   (4, 2)
    #   τ3 = [ 2,  1, -3,  0.1]  → trimmed [2,  0, -3,  0]   (3, 2); weighted by 0.5: [1, 0, -1.5, 0]
    #   weighted sum = [4, -4, 0.5, -2] → elected signs [+, -, +, -]
    #   element 0: agreeing τ1 (3·1) and τ3 (2·0.5): (3 + 1) / (1 + 0.5) = 8/3
    #   element 1: only τ2 agrees: -4 / 1 = -4
    #   element 2: + wins (0.5); τ2 agrees (2), τ3 (-1.5) does not: 2 / 1 = 2
    #   element 3: only τ1 agrees: -2 / 1 = -2
    #   merged = base + 1 · [8/3, -4, 2, -2] = [11/3, -3, 3, -1]
    base = torch.ones(4)
    taus = [[3, -1, 0.5, -2], [-1, -4, 2, 1], [2, 1, -3, 0.1]]
    t = resident([base + torch.tensor(tau) for tau in taus], base)
    out = run("ties", t, make_ctx(t), weight=[1.0, 1.0, 0.5], density=[0.5] * 3, **{"lambda": 1.0})
    torch.testing.assert_close(out, torch.tensor([11 / 3, -3.0, 3.0, -1.0]), rtol=0, atol=1e-6)
    # unnormalised: the sums of agreeing weighted entries, [4, -4, 2, -2]
    out = run("ties", t, make_ctx(t), options={"normalize": False}, weight=[1.0, 1.0, 0.5], density=[0.5] * 3, **{"lambda": 1.0})
    torch.testing.assert_close(out, base + torch.tensor([4.0, -4.0, 2.0, -2.0]), rtol=0, atol=1e-6)


def test_ties_zero_weighted_sum_elects_positive(make_ctx):
    # τ1 = +1, τ2 = -1 with equal weights: the sum is 0, mergekit elects +, so only τ1 survives.
    base = torch.zeros(3)
    t = resident([torch.ones(3), -torch.ones(3)], base)
    out = run("ties", t, make_ctx(t), weight=[1.0, 1.0], density=[1.0, 1.0], **{"lambda": 1.0})
    torch.testing.assert_close(out, torch.ones(3))


@pytest.mark.parametrize(
    "shape, weights, densities, lam, normalize",
    [
        ((40, 25), [1.0, 0.6, 1.4], [0.5, 0.2379, 0.9], 1.0, True),  # 237.9 entries: k = 237
        ((40, 25), [1.0, 0.6, 1.4], [0.5, 0.2, 0.9], 0.7, False),
        ((1000,), [0.3, 2.0], [1.0, 0.05], 1.3, True),
        ((300, 200), [0.8, 1.1, 0.5, 1.0], [0.3, 0.3, 0.6, 1.0], 1.0, True),  # > MAGNITUDE_SAMPLE elements
    ],
)
def test_ties_matches_naive_reference(make_ctx, shape, weights, densities, lam, normalize):
    base = randn(*shape, seed=0)
    experts = [base + randn(*shape, seed=i + 1) * (0.5 + i) for i in range(len(weights))]
    t = resident(experts, base)
    out = run("ties", t, make_ctx(t, chunk=997), options={"normalize": normalize}, weight=weights, density=densities, **{"lambda": lam})
    expected = ties_reference(base, experts, weights, densities, lam, normalize)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("numel, density", [(1000, 0.3779), (1000, 0.001), (100_000, 0.3), (100_000, 0.999)])
def test_ties_trim_keeps_exactly_the_top_k(make_ctx, numel, density):
    tau = randn(numel, seed=4)
    t = resident([tau], torch.zeros(numel))
    out = run("ties", t, make_ctx(t), weight=[1.0], density=[density], **{"lambda": 1.0})
    k = int(density * numel)
    kept = (out != 0).nonzero().view(-1)
    assert kept.numel() == k
    assert set(kept.tolist()) == set(tau.abs().topk(k).indices.tolist()) if k else True
    torch.testing.assert_close(out[kept], tau[kept])


def test_ties_density_rounding_to_zero_keeps_nothing(make_ctx):
    base = randn(50, seed=0)
    t = resident([base + randn(50, seed=1)], base)
    out = run("ties", t, make_ctx(t), weight=[1.0], density=[0.01], **{"lambda": 1.0})  # int(0.5) = 0
    torch.testing.assert_close(out, base)


# --- DARE --------------------------------------------------------------------------------------------


def test_dare_with_density_one_is_task_arithmetic_and_ties_without_trim(make_ctx):
    base = randn(30, 40, seed=0)
    experts = [base + randn(30, 40, seed=i) for i in (1, 2, 3)]
    weights, lam = [0.4, 1.0, 1.5], 0.9
    t = resident(experts, base)
    dense = [1.0] * 3
    ta = run("task_arithmetic", t, make_ctx(t), weight=weights, **{"lambda": lam})
    dare_linear = run("dare_linear", t, make_ctx(t, seed=5), weight=weights, density=dense, **{"lambda": lam})
    torch.testing.assert_close(dare_linear, ta, rtol=1e-6, atol=1e-6)
    for normalize in (False, True):
        opts = {"normalize": normalize}
        ties = run("ties", t, make_ctx(t), options=opts, weight=weights, density=dense, **{"lambda": lam})
        dare_ties = run("dare_ties", t, make_ctx(t, seed=5), options=opts, weight=weights, density=dense, **{"lambda": lam})
        torch.testing.assert_close(dare_ties, ties, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dare_ties, ties_reference(base, experts, weights, dense, lam, normalize), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 0.9])
def test_dare_keeps_about_density_and_rescales_survivors(make_ctx, density):
    n = 200_000
    tau = randn(n, seed=1)
    t = resident([tau], torch.zeros(n))
    out = run("dare_linear", t, make_ctx(t, seed=11, chunk=1 << 14), weight=[0.8], density=[density], **{"lambda": 1.0})
    kept = out != 0
    # binomial std is sqrt(d(1-d)/n) ≤ 0.0012; 0.01 also absorbs any rounding of the keep probability
    assert abs(kept.float().mean().item() - density) < 0.01
    # survivors are rescaled by 1 / (keep probability): the observed fraction kept estimates it to
    # within ~1% here; the module documents a keep probability of density rounded to 1/256
    ratio = out[kept] / (0.8 * tau[kept])
    fraction = kept.float().mean().item()
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / fraction), rtol=0.03)
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / density), rtol=(1 / 512) / (density - 1 / 512))
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)  # one factor for the whole tensor
    no_rescale = run("dare_linear", t, make_ctx(t, seed=11, chunk=1 << 14), options={"rescale": False}, weight=[0.8], density=[density], **{"lambda": 1.0})
    assert torch.equal(no_rescale != 0, kept)  # same seed, same mask
    torch.testing.assert_close(no_rescale[kept], 0.8 * tau[kept])


def test_dare_preserves_the_expectation_of_task_arithmetic(make_ctx):
    base = randn(2000, seed=0)
    experts = [base + randn(2000, seed=1), base + randn(2000, seed=2)]
    weights, densities, lam = [0.7, 1.3], [0.5, 0.25], 1.1
    t = resident(experts, base)
    n_seeds = 400
    total = torch.zeros(2000, dtype=torch.float64)
    total_plain = torch.zeros(2000, dtype=torch.float64)
    for seed in range(n_seeds):
        total += run("dare_linear", t, make_ctx(t, seed=seed), weight=weights, density=densities, **{"lambda": lam}).double()
        total_plain += run("dare_linear", t, make_ctx(t, seed=seed), options={"rescale": False}, weight=weights, density=densities, **{"lambda": lam}).double()
    mean, mean_plain = total / n_seeds - base.double(), total_plain / n_seeds - base.double()
    ta = lam * sum(w * (e - base) for w, e in zip(weights, experts)).double()
    # per-entry std of the mean: |τ|·sqrt((1/p − 1)/N): a relative L2 error of about 0.07 is expected
    assert ((mean - ta).norm() / ta.norm()).item() < 0.15
    # without rescaling, the expectation shrinks to Σ p_i w_i τ_i (the test can tell the two apart)
    shrunk = lam * sum(p * w * (e - base) for p, w, e in zip(densities, weights, experts)).double()
    assert ((mean_plain - shrunk).norm() / shrunk.norm()).item() < 0.15
    assert ((mean_plain - ta).norm() / ta.norm()).item() > 0.4


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_seed_determines_the_mask(make_ctx, method):
    base = randn(5000, seed=0)
    t = resident([base + randn(5000, seed=1), base + randn(5000, seed=2)], base)
    params = dict(weight=[1.0, 1.0], density=[0.5, 0.5], **{"lambda": 1.0})
    a = run(method, t, make_ctx(t, seed=123), **params)
    b = run(method, t, make_ctx(t, seed=123), **params)
    c = run(method, t, make_ctx(t, seed=124), **params)
    assert torch.equal(a, b)
    differing = (a != c).float().mean().item()
    assert differing > 0.2  # with independent masks about 60% of entries differ


def test_dare_masks_are_independent_across_experts(make_ctx):
    # Identical all-ones task vectors: with independent masks the sum is 1 where exactly one expert
    # kept its entry, which happens with probability 2·p·(1 − p) = 0.5 at p = 0.5.
    n = 100_000
    t = resident([torch.ones(n), torch.ones(n)], torch.zeros(n))
    out = run("dare_linear", t, make_ctx(t, seed=3), options={"rescale": False}, weight=[1.0, 1.0], density=[0.5, 0.5], **{"lambda": 1.0})
    assert abs((out == 1).float().mean().item() - 0.5) < 0.02
    assert abs((out == 2).float().mean().item() - 0.25) < 0.02


def test_dare_ties_applies_sign_consensus_to_the_kept_entries(make_ctx):
    # The drop masks depend only on the seed and the densities, so a dare_linear run (rescale off)
    # on task vectors 1, 2, 4 with the same seed encodes expert i's mask in bit i of its output.
    # dare_ties must equal TIES' election and sum over those masked, rescaled task vectors.
    n = 3000
    base = randn(n, seed=0)
    experts = [base + randn(n, seed=i) for i in (1, 2, 3)]
    weights, densities = [1.0, 0.5, 1.5], [0.5, 0.25, 0.75]
    t = resident(experts, base)
    probe = resident([base + 1.0, base + 2.0, base + 4.0], base)
    code = run("dare_linear", probe, make_ctx(probe, seed=9), options={"rescale": False}, weight=[1.0, 1.0, 1.0], density=densities, **{"lambda": 1.0}) - base
    code = code.round().to(torch.int64)
    masks = [((code >> i) & 1).bool() for i in range(3)]
    for mask, d in zip(masks, densities):
        assert abs(mask.float().mean().item() - d) < 0.05
    rescaled = [(e - base) * m / d for e, m, d in zip(experts, masks, densities)]
    expected = ties_reference(base, [base + r for r in rescaled], weights, [1.0] * 3, 1.0, normalize=False)
    out = run("dare_ties", t, make_ctx(t, seed=9), weight=weights, density=densities, **{"lambda": 1.0})
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dare_density_zero_keeps_nothing(make_ctx):
    base = randn(500, seed=0)
    t = resident([base + randn(500, seed=1)], base)
    out = run("dare_linear", t, make_ctx(t, seed=1), weight=[1.0], density=[0.0], **{"lambda": 1.0})
    torch.testing.assert_close(out, base)


def test_reference_helpers_are_sane():
    # guard the reference itself: trim_top_k keeps k entries and they are the largest ones
    tau = torch.tensor([0.1, -5.0, 3.0, -0.2, 4.0])
    assert trim_top_k(tau, 0.6).tolist() == [0.0, -5.0, 3.0, 0.0, 4.0]
    assert math.isclose(float(ties_reference(torch.zeros(1), [torch.tensor([2.0])], [0.5], [1.0])[0]), 2.0)
