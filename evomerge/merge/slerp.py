"""Spherical interpolation: SLERP of two experts, and M2N2's split-point SLERP.

SLERP follows mergekit's ``slerp`` (Shoemake's formula per tensor; ``t = 0`` gives the first
expert; nearly parallel tensors fall back to linear interpolation). The split-point variant is the
crossover of M2N2 (Abrantes et al., "Competition and Attraction Improve Model Fusion", 2025, eq. 2)
as the authors' code implements it: one angle Ω between the two whole flattened parameter sets,
the mixing ratio ``w_m`` before the split position and ``1 − w_m`` after it, and linear
interpolation when ``sin Ω ≤ 1e-6``.

Both are linear combinations of two parameter sets with coefficients that depend only on inner
products, so kernels take those from precomputed Gram matrices and write the result in one pass.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor, combine_
from evomerge.space.interpolation import split_slerp_coefficients

DOT_THRESHOLD = 0.9995
"""mergekit's bound on |cos Ω| above which SLERP degenerates to linear interpolation."""
NORM_EPS = 1e-8


def slerp_coefficients(t: float, cos_omega: float) -> tuple[float, float]:
    """Coefficients ``(s0, s1)`` with ``slerp(t; a, b) = s0·a + s1·b`` (mergekit convention)."""
    if abs(cos_omega) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, cos_omega)))
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def cosine_from_gram(gram: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """cos of the angle between ``a·rows`` and ``b·rows`` given the rows' Gram matrix."""
    ab = float(a @ gram @ b)
    aa = float(a @ gram @ a)
    bb = float(b @ gram @ b)
    if aa <= NORM_EPS**2 or bb <= NORM_EPS**2:
        return 0.0
    return ab / math.sqrt(aa * bb)


def slerp_kernel(
    out: torch.Tensor,
    tensor: ResidentTensor,
    params: Mapping[str, Sequence[float] | float],
    options: Mapping[str, bool],
    ctx: TensorContext,
) -> None:
    t = float(params["t"])  # type: ignore[arg-type]
    basis = tensor.model_basis()
    cos_omega = cosine_from_gram(tensor.gram(ctx.scratch), basis[0], basis[1])
    s0, s1 = slerp_coefficients(t, cos_omega)
    combine_(out, tensor, [s0, s1], ctx.chunk)


def split_slerp_kernel(
    out: torch.Tensor,
    tensor: ResidentTensor,
    params: Mapping[str, Sequence[float] | float],
    options: Mapping[str, bool],
    ctx: TensorContext,
) -> None:
    """Per-tensor part of the split-point SLERP of experts 0 and 1 over the whole model.

    ``split`` is a fraction of the flattened parameter count; ``ctx.flat_gram`` is the Gram
    matrix summed over every tensor, so all tensors share one Ω.
    """
    if ctx.flat_gram is None:
        raise ValueError("split-point SLERP needs the Gram matrix of the whole parameter set")
    mix = float(params["mix"])  # type: ignore[arg-type]
    split = int(round(float(params["split"]) * ctx.total))  # type: ignore[arg-type]
    basis = tensor.model_basis()
    cos_omega = cosine_from_gram(ctx.flat_gram, basis[0], basis[1])
    before = split_slerp_coefficients(mix, cos_omega)
    after = split_slerp_coefficients(1.0 - mix, cos_omega)
    local = min(max(split - ctx.offset, 0), tensor.numel)
    if local > 0:
        combine_(out, tensor, list(before), ctx.chunk, segment=(0, local))
    if local < tensor.numel:
        combine_(out, tensor, list(after), ctx.chunk, segment=(local, tensor.numel))
