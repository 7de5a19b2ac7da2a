"""SLERP (mergekit's per-tensor convention) and M2N2's split-point SLERP, against plain formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.merge import MERGE_METHODS
from evomerge.merge.resident import ResidentTensor
from evomerge.space.merge_space import Space
from evomerge.strategies.m2n2 import split_point_slerp


def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def slerp_reference(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Shoemake's SLERP as mergekit applies it: lerp when |cos Ω| > 0.9995."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    cos = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).to(a.dtype)
    omega = math.acos(cos)
    s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return (s0 * a.double() + s1 * b.double()).to(a.dtype)


def split_slerp_reference(parent_a, parent_b, split: int, mix: float) -> list[torch.Tensor]:
    """M2N2's crossover as the authors' helper computes it: one flat vector, one Ω for all of it,
    element-wise t = mix before the split index and 1 − mix from it on, lerp when sin Ω ≤ 1e-6."""
    a = torch.cat([p.double().reshape(-1) for p in parent_a])
    b = torch.cat([p.double().reshape(-1) for p in parent_b])
    t = torch.full_like(a, mix)
    t[split:] = 1 - mix
    omega = torch.arccos(torch.clamp((a / a.norm()) @ (b / b.norm()), -1, 1))
    if torch.sin(omega) <= 1e-6:
        child = (1 - t) * a + t * b
    else:
        child = torch.sin((1 - t) * omega) / torch.sin(omega) * a + torch.sin(t * omega) / torch.sin(omega) * b
    pieces, start = [], 0
    for p in parent_a:
        pieces.append(child[start : start + p.numel()].view(p.shape).to(p.dtype))
        start += p.numel()
    return pieces


def run_slerp(make_ctx, a, b, t, base=None) -> torch.Tensor:
    if base is None:
        tensor = ResidentTensor("w", torch.stack([a, b]))
    else:
        tensor = ResidentTensor("w", torch.stack([a - base, b - base]), base.clone())
    out = torch.full_like(a, float("nan"))
    MERGE_METHODS["slerp"].kernel(out, tensor, {"t": t}, {}, make_ctx(tensor, chunk=7))
    return out


# --- SLERP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_base", [False, True])
def test_slerp_endpoints_are_the_experts(make_ctx, with_base):
    a, b = randn(6, 5, seed=1), randn(6, 5, seed=2)
    base = randn(6, 5, seed=3) if with_base else None
    torch.testing.assert_close(run_slerp(make_ctx, a, b, 0.0, base), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(run_slerp(make_ctx, a, b, 1.0, base), b, rtol=0, atol=1e-6)


def test_slerp_of_orthogonal_vectors_at_half_is_the_arc_midpoint(make_ctx):
    q, _ = torch.linalg.qr(randn(16, 2, seed=4, dtype=torch.float64))
    a, b = (3 * q[:, 0]).float(), (3 * q[:, 1]).float()  # orthogonal, both of norm 3
    out = run_slerp(make_ctx, a, b, 0.5)
    torch.testing.assert_close(out, (a + b) / math.sqrt(2), rtol=1e-5, atol=1e-6)
    assert math.isclose(out.norm().item(), 3.0, rel_tol=1e-5)  # stays on the sphere (lerp gives 3/√2)
    for end in (a, b):
        assert math.isclose(torch.dot(out, end).item() / 9.0, math.cos(math.pi / 4), rel_tol=1e-5)


@pytest.mark.parametrize("t", [0.15, 0.5, 0.8])
@pytest.mark.parametrize("with_base", [False, True])
def test_slerp_matches_shoemake_formula(make_ctx, t, with_base):
    a = randn(40, seed=5)
    b = 0.6 * a + randn(40, seed=6)  # an angle well away from 0 and π/2
    base = randn(40, seed=7) if with_base else None
    torch.testing.assert_close(run_slerp(make_ctx, a, b, t, base), slerp_reference(t, a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_slerp_of_nearly_parallel_vectors_is_linear(make_ctx, sign):
    a = randn(200, seed=8)
    b = sign * (1.7 * a + 1e-3 * randn(200, seed=9))
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()
    assert abs(cos) > 0.9995
    for t in (0.3, 0.9):
        torch.testing.assert_close(run_slerp(make_ctx, a, b, t), (1 - t) * a + t * b, rtol=1e-5, atol=1e-5)


def test_slerp_takes_one_angle_per_tensor(make_setup):
    # Through the materializer at per_tensor granularity: every tensor gets its own t and its own Ω.
    setup = make_setup("slerp", 2, False)
    space = Space.build(setup.method, setup.names, 2, granularity="per_tensor")
    assert space.dim == len(setup.names)
    genome = np.linspace(0.1, 0.9, space.dim)
    targets = setup.targets()
    setup.materializer(targets).apply(space.decode(genome))
    for name, t in zip(setup.names, genome):
        expected = slerp_reference(float(t), setup.experts[0][name], setup.experts[1][name])
        torch.testing.assert_close(targets[name], expected, rtol=1e-5, atol=1e-5, msg=name)


# --- M2N2 split-point SLERP -------------------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 3, 2)]  # 12 + 5 + 12 = 29 elements; tensor boundaries at 12 and 17


def crossover(parent_a, parent_b, split: int, mix: float) -> list[torch.Tensor]:
    """M2N2's crossover on lists of tensors read as one flat vector (the strategy works on flat vectors)."""
    flat_a = torch.cat([x.reshape(-1) for x in parent_a]).numpy()
    flat_b = torch.cat([x.reshape(-1) for x in parent_b]).numpy()
    child = torch.from_numpy(split_point_slerp(flat_a, flat_b, split, mix))
    return [part.view(x.shape) for part, x in zip(child.split([x.numel() for x in parent_a]), parent_a)]


def _parents(seed: int, dtype=torch.float32):
    a = [randn(*s, seed=seed + i, dtype=dtype) for i, s in enumerate(SHAPES)]
    b = [randn(*s, seed=seed + 10 + i, dtype=dtype) for i, s in enumerate(SHAPES)]
    return a, b


@pytest.mark.parametrize("split", [0, 1, 7, 12, 14, 17, 28, 29])
@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_split_point_slerp_matches_authors_formula(split, mix):
    a, b = _parents(20)
    out = crossover(a, b, split, mix)
    for got, want in zip(out, split_slerp_reference(a, b, split, mix)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_split_point_slerp_segments_are_the_two_slerps():
    # Independent of the reference's indexing: before the split the child is SLERP(mix), after it
    # SLERP(1 − mix), both with the angle of the whole vectors, not of the segments.
    a, b = _parents(30)
    fa, fb = torch.cat([x.reshape(-1) for x in a]), torch.cat([x.reshape(-1) for x in b])
    out = crossover(a, b, 14, 0.25)
    child = torch.cat([x.reshape(-1) for x in out])
    whole_before, whole_after = slerp_reference(0.25, fa, fb), slerp_reference(0.75, fa, fb)
    torch.testing.assert_close(child[:14], whole_before[:14], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(child[14:], whole_after[14:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_split_point_slerp_falls_back_to_lerp_for_parallel_parents(scale):
    a, _ = _parents(40)
    b = [scale * x for x in a]  # Ω = 0: the spherical formula would divide by sin Ω = 0
    out = crossover(a, b, 10, 0.2)
    child, fa = torch.cat([x.reshape(-1) for x in out]), torch.cat([x.reshape(-1) for x in a])
    t = torch.full_like(fa, 0.2)
    t[10:] = 0.8
    torch.testing.assert_close(child, (1 - t) * fa + t * scale * fa, rtol=1e-6, atol=1e-6)


def test_split_point_slerp_stays_spherical_where_mergekit_would_lerp():
    # cos Ω ≈ 0.9997: mergekit's SLERP would interpolate linearly (|cos| > 0.9995), M2N2 does not.
    a, _ = _parents(50, dtype=torch.float64)
    noise, _ = _parents(60, dtype=torch.float64)
    b = [x + 0.025 * n for x, n in zip(a, noise)]
    fa, fb = torch.cat([x.reshape(-1) for x in a]), torch.cat([x.reshape(-1) for x in b])
    cos = float(fa @ fb / (fa.norm() * fb.norm()))
    assert 0.9995 < cos < 1 - 1e-9
    out = crossover(a, b, 20, 0.4)
    child = torch.cat([x.reshape(-1) for x in out])
    want = torch.cat([x.reshape(-1) for x in split_slerp_reference(a, b, 20, 0.4)])
    torch.testing.assert_close(child, want, rtol=1e-12, atol=1e-12)
    t = torch.full_like(fa, 0.4)
    t[20:] = 0.6
    assert (child - ((1 - t) * fa + t * fb)).abs().max() > 1e-8  # measurably not a lerp


@pytest.mark.parametrize("with_base", [False, True])
def test_registry_split_slerp_equals_split_point_slerp(make_setup, with_base):
    setup = make_setup("split_slerp", 2, with_base)
    space = Space.build(setup.method, setup.names, 2, granularity="global")
    assert space.dim == 2
    sizes = [int(np.prod(s)) for s in setup.layout.values()]
    total = sum(sizes)
    # 0, inside the first tensor, a tensor boundary, inside a later tensor, the end
    for split in (0, 5, sizes[0], sizes[0] + sizes[1] + 17, total):
        genome = space.encode({"split": split / total, "mix": 0.3})
        targets = setup.targets()
        setup.materializer(targets, chunk=11).apply(space.decode(genome))
        a = [setup.experts[0][n] for n in setup.names]
        b = [setup.experts[1][n] for n in setup.names]
        expected = crossover(a, b, split, 0.3)
        reference = split_slerp_reference(a, b, split, 0.3)
        for name, e, r in zip(setup.names, expected, reference):
            torch.testing.assert_close(targets[name], e, rtol=1e-5, atol=1e-5, msg=f"split {split}: {name}")
            torch.testing.assert_close(targets[name], r, rtol=1e-5, atol=1e-5, msg=f"split {split}: {name}")


def test_split_slerp_kernel_requires_the_flat_gram(make_ctx):
    tensor = ResidentTensor("w", torch.stack([randn(4, seed=1), randn(4, seed=2)]))
    with pytest.raises(ValueError, match="Gram"):
        MERGE_METHODS["split_slerp"].kernel(torch.empty(4), tensor, {"split": 0.5, "mix": 0.5}, {}, make_ctx(tensor))
