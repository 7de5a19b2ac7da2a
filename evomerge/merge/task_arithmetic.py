"""Task arithmetic and its sparsified, sign-consensus variants: TIES and DARE.

One operator, configured four ways, as in mergekit's generalized task arithmetic:

* ``task_arithmetic`` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023):
  θ = θ_base + λ · Σ_i w_i τ_i, τ_i = θ_i − θ_base.
* ``ties`` (Yadav et al., "TIES-Merging", NeurIPS 2023): trim each τ_i to its top ``density``
  fraction by magnitude, elect the sign of Σ_i w_i τ̂_i per element, and average only the entries
  that agree with it (the "disjoint mean": divide by the summed weights of the agreeing experts).
* ``dare_linear`` / ``dare_ties`` (Yu et al., "Language Models are Super Mario", ICML 2024): drop
  each entry of τ_i with probability 1 − density and rescale survivors by 1/density, then combine
  linearly or with TIES' sign consensus.

Defaults follow mergekit (``normalize``: on for TIES only; ``rescale``: on for DARE). Choices made:
the TIES trim keeps every entry whose magnitude is at least the k-th largest (k = ⌊density·n⌋), so
ties at the threshold are kept rather than broken by index; DARE draws its keep decisions from 8
random bits per entry, so the keep probability is density rounded to 1/256 and rescaling divides
by that exact probability (the expectation of each entry is preserved exactly). The bits come from
a counter-based hash of the entry's position keyed per expert by the candidate's generator, so a
mask depends on the seed and the densities only (not on the chunk size or the weights' values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from evomerge.merge.method import MergeMethod, OptionSpec, ParamSpec, TensorContext
from evomerge.merge.resident import ResidentTensor, Scratch, chunk_bounds, combine_, shrink_bound, work_step

DARE_LEVELS = 256
WEIGHT_SUM_EPS = 1e-8


@dataclass(frozen=True)
class _Variant:
    sparsify: str | None  # None, "magnitude" or "random"
    consensus: bool


def _magnitude_thresholds(tensor: ResidentTensor, densities: Sequence[float], ctx: TensorContext) -> list[float | None]:
    n = tensor.numel
    keeps = [None if d >= 1.0 else int(d * n) for d in densities]
    found = tensor.magnitude_thresholds(
        [k if k is not None and k > 0 else None for k in keeps], chunk=ctx.chunk, scratch=ctx.scratch
    )
    return [None if k is None else (math.inf if k <= 0 else t) for k, t in zip(keeps, found)]


def _dare_levels(densities: Sequence[float]) -> list[int]:
    """Keep decisions compare a random byte with this level; DARE_LEVELS means keep everything."""
    return [DARE_LEVELS if d >= 1.0 else int(round(max(d, 0.0) * DARE_LEVELS)) for d in densities]


# --- DARE's random bytes: a counter-based hash, keyed per expert ------------------------------------

_LOWBIAS_M1 = 0x7FEB352D
_LOWBIAS_M2 = 0x846CA68B - (1 << 32)  # as a signed 32-bit integer


def _xorshift_right_(z: torch.Tensor, tmp: torch.Tensor, k: int) -> None:
    """``z ^= z >>> k`` on int32 (a logical shift: the arithmetic one, then the sign bits masked off)."""
    torch.bitwise_right_shift(z, k, out=tmp)
    tmp.bitwise_and_((1 << (32 - k)) - 1)
    z.bitwise_xor_(tmp)


def _dare_keys(m: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One key per expert from the candidate's generator (keys and counters stay below 2³⁰)."""
    keys = torch.randint(0, 1 << 30, (m, 1), generator=generator, device=generator.device, dtype=torch.int32)
    return keys.to(device)


def _keep_mask_(keep: torch.Tensor, keys: torch.Tensor, max_byte: torch.Tensor, start: int, scratch: Scratch) -> None:
    """``keep[i, j] = 1`` where the random byte of expert ``i``'s entry ``start + j`` is ≤ ``max_byte[i]``.

    Entry ``p``'s byte is byte ``p mod 4`` of lowbias32(``p // 4 + key_i``) (C. Wellons' 32-bit
    integer hash), so it depends on the key and the position only: a mask is the same for any
    chunk size, costs a few integer ops per 4 entries, and is drawn the same way on every device.
    """
    m, c = keep.shape
    first, last = start // 4, (start + c + 3) // 4
    words = last - first
    z = scratch.get("dare_words", (m, words), torch.int32, keep.device)
    tmp = scratch.get("dare_tmp", (m, words), torch.int32, keep.device)
    counter = scratch.get("dare_counter", (words,), torch.int32, keep.device)
    torch.arange(first, last, dtype=torch.int32, device=keep.device, out=counter)
    torch.add(counter, keys, out=z)
    _xorshift_right_(z, tmp, 16)
    z.mul_(_LOWBIAS_M1)
    _xorshift_right_(z, tmp, 15)
    z.mul_(_LOWBIAS_M2)
    _xorshift_right_(z, tmp, 16)
    offset = start - 4 * first
    torch.le(z.view(torch.uint8)[:, offset : offset + c], max_byte, out=keep)


# --- the two passes: a (masked) weighted sum, and TIES' sign consensus ------------------------------


def _masked_sum_(
    out: torch.Tensor, tensor: ResidentTensor, coefs: Sequence[float], levels: Sequence[int], ctx: TensorContext
) -> None:
    """``out = base + Σ_i c_i · keep_i · τ_i`` (DARE without consensus), one op per expert per chunk."""
    rows, ref, flat_out = tensor.flat_stack(), tensor.flat_reference(), out.view(-1)
    assert ref is not None
    m, n = tensor.n_models, tensor.numel
    device, dtype = rows.device, rows.dtype
    keys = _dare_keys(m, ctx.generator, device)
    max_byte = torch.tensor([max(lv - 1, 0) for lv in levels], device=device, dtype=torch.uint8).view(m, 1)
    step = work_step(ctx.chunk, m)
    keep = ctx.scratch.get("keep", (m, min(step, n)), dtype, device)
    active = [(i, float(c)) for i, c in enumerate(coefs) if c != 0.0]
    for s, e in chunk_bounds(n, step):
        out_c = flat_out[s:e]
        if not active:
            out_c.copy_(ref[s:e])
            continue
        k_c = keep[:, : e - s]
        _keep_mask_(k_c, keys, max_byte, s, ctx.scratch)
        i, c = active[0]
        torch.addcmul(ref[s:e], rows[i, s:e], k_c[i], value=c, out=out_c)
        for i, c in active[1:]:
            out_c.addcmul_(rows[i, s:e], k_c[i], value=c)


def _consensus_(
    out: torch.Tensor,
    tensor: ResidentTensor,
    weights: Sequence[float],
    scales: Sequence[float],
    thresholds: Sequence[float | None],
    levels: Sequence[int] | None,
    lam: float,
    normalize: bool,
    ctx: TensorContext,
) -> None:
    """TIES' trim (or DARE's drop), sign election and disjoint mean, on cache-sized chunks.

    With ``W`` the weighted, sparsified task vectors and ``M = ±1`` the elected sign (a zero sum
    elects +), ``max(M·W_i, 0)`` is ``|W_i|`` where expert ``i`` agrees and 0 elsewhere, so the
    agreeing sum is ``M · Σ_i max(M·W_i, 0)`` and the agreeing weights are ``Σ_i w_i · sign(max(M·W_i, 0))``:
    every step is a plain float op on preallocated buffers, summed in expert order.
    """
    rows, ref, flat_out = tensor.flat_stack(), tensor.flat_reference(), out.view(-1)
    assert ref is not None
    m, n = tensor.n_models, tensor.numel
    device, dtype = rows.device, rows.dtype
    step = work_step(ctx.chunk, m)
    width = min(step, n)
    scratch = ctx.scratch
    weighted = scratch.get("ties_weighted", (m, width), dtype, device)
    total = scratch.get("ties_sum", (width,), dtype, device)
    elected = scratch.get("ties_sign", (width,), dtype, device)
    mixed = scratch.get("ties_mixed", (width,), dtype, device)
    if normalize:
        divisor = scratch.get("ties_divisor", (width,), dtype, device)
        is_zero = scratch.get("ties_zero", (width,), dtype, device)
    scale_col = torch.tensor(list(scales), device=device, dtype=dtype).view(m, 1)
    bounds = [None if t is None else shrink_bound(t, dtype) for t in thresholds]
    trim = any(b is not None for b in bounds)
    if levels is not None:
        keys = _dare_keys(m, ctx.generator, device)
        max_byte = torch.tensor([max(lv - 1, 0) for lv in levels], device=device, dtype=torch.uint8).view(m, 1)
        keep = scratch.get("keep", (m, width), dtype, device)
    for s, e in chunk_bounds(n, step):
        c = e - s
        tau, w = rows[:, s:e], weighted[:, :c]
        if trim:
            for i, bound in enumerate(bounds):
                if bound is None:
                    w[i].copy_(tau[i])
                else:
                    torch.hardshrink(tau[i], bound, out=w[i])  # keeps |τ| ≥ threshold
            w.mul_(scale_col)
        else:
            torch.mul(tau, scale_col, out=w)
        if levels is not None:
            k_c = keep[:, :c]
            _keep_mask_(k_c, keys, max_byte, s, scratch)
            w.mul_(k_c)
        t_c, m_c, x_c = total[:c], elected[:c], mixed[:c]
        _sum_rows(w, t_c)
        torch.ge(t_c, 0, out=m_c)
        m_c.mul_(2).sub_(1)
        w.mul_(m_c).clamp_min_(0)
        _sum_rows(w, x_c)
        if normalize:
            d_c, z_c = divisor[:c], is_zero[:c]
            torch.sign(w, out=w)  # 1 where the expert agrees
            torch.mul(w[0], float(weights[0]), out=d_c)
            for i in range(1, m):
                d_c.add_(w[i], alpha=float(weights[i]))
            torch.eq(d_c, 0, out=z_c)
            d_c.add_(z_c)  # no agreeing weight: divide by 1
            x_c.div_(d_c)
        x_c.mul_(m_c)
        torch.add(ref[s:e], x_c, alpha=lam, out=flat_out[s:e])


def _sum_rows(rows: torch.Tensor, out: torch.Tensor) -> None:
    """``out = rows[0] + rows[1] + …`` in this order (as ``rows.sum(0)`` adds a few rows)."""
    if rows.shape[0] == 1:
        out.copy_(rows[0])
        return
    torch.add(rows[0], rows[1], out=out)
    for i in range(2, rows.shape[0]):
        out.add_(rows[i])


def _make_kernel(variant: _Variant):
    def kernel(
        out: torch.Tensor,
        tensor: ResidentTensor,
        params: Mapping[str, Sequence[float] | float],
        options: Mapping[str, bool],
        ctx: TensorContext,
    ) -> None:
        if tensor.reference is None:
            raise ValueError(f"{tensor.name}: task arithmetic needs a base model")
        m = tensor.n_models
        weights = [float(w) for w in params["weight"]]  # type: ignore[union-attr]
        lam = float(params.get("lambda", 1.0))  # type: ignore[arg-type]
        densities = [float(d) for d in params.get("density", [1.0] * m)]  # type: ignore[union-attr]
        scales = list(weights)
        thresholds: list[float | None] = [None] * m
        levels: list[int] = [DARE_LEVELS] * m
        if variant.sparsify == "magnitude":
            thresholds = _magnitude_thresholds(tensor, densities, ctx)
        elif variant.sparsify == "random":
            levels = _dare_levels(densities)
            rescale = options.get("rescale", False)
            scales = [
                0.0 if lv == 0 else (w * DARE_LEVELS / lv if rescale else w)
                for w, lv in zip(weights, levels)
            ]
        normalize = options.get("normalize", False)
        random_mask = any(lv < DARE_LEVELS for lv in levels)
        if variant.consensus:
            _consensus_(
                out, tensor, weights, scales, thresholds, levels if random_mask else None, lam, normalize, ctx
            )
            return
        plain_divisor = sum(weights)
        plain_divisor = plain_divisor if abs(plain_divisor) >= WEIGHT_SUM_EPS else 1.0
        factor = lam / plain_divisor if normalize else lam
        coefs = [factor * s for s in scales]  # base + λ·Σ_i s_i τ_i (/ Σ_i w_i), folded per expert
        if random_mask:
            _masked_sum_(out, tensor, coefs, levels, ctx)
        else:
            combine_(out, tensor, coefs, ctx.chunk, ref_coef=1.0)

    return kernel


_WEIGHT = ParamSpec("weight", per_model=True, default=1.0, low=0.0, high=2.0, doc="scale of the task vector")
_DENSITY = ParamSpec("density", per_model=True, default=0.5, low=0.05, high=1.0, doc="fraction of the task vector kept")
_LAMBDA = ParamSpec("lambda", per_model=False, default=1.0, low=0.0, high=2.0, doc="scale of the combined task vector")


def _family(name: str, variant: _Variant, normalize: bool, rescale: bool, doc: str) -> MergeMethod:
    params = (_WEIGHT, _DENSITY, _LAMBDA) if variant.sparsify else (_WEIGHT, _LAMBDA)
    options = [OptionSpec("normalize", normalize, "divide by the summed weights (of agreeing experts for TIES)")]
    if variant.sparsify == "random":
        options.append(OptionSpec("rescale", rescale, "rescale kept entries by 1/keep probability"))
    return MergeMethod(
        name=name,
        kernel=_make_kernel(variant),
        params=params,
        options=tuple(options),
        needs_base=True,
        doc=doc,
        mergekit_name=name,
    )


TASK_ARITHMETIC = _family(
    "task_arithmetic", _Variant(None, False), normalize=False, rescale=False,
    doc="Base plus a weighted sum of task vectors.",
)
TIES = _family(
    "ties", _Variant("magnitude", True), normalize=True, rescale=False,
    doc="Trim task vectors by magnitude, elect signs, average the agreeing entries.",
)
DARE_LINEAR = _family(
    "dare_linear", _Variant("random", False), normalize=False, rescale=True,
    doc="Randomly drop task-vector entries, rescale, and sum.",
)
DARE_TIES = _family(
    "dare_ties", _Variant("random", True), normalize=False, rescale=True,
    doc="Randomly drop task-vector entries, rescale, and combine with TIES' sign consensus.",
)
