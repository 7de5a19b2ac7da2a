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

Defaults (declared in ``declarations.py``) follow mergekit (``normalize``: on for TIES only;
``rescale``: on for DARE). Choices made: the TIES trim keeps every entry whose magnitude is at
least the k-th largest (k = ⌊density·n⌋), so ties at the threshold are kept rather than broken by index; DARE draws its keep decisions from 8
random bits per entry, so the keep probability is density rounded to 1/256 and rescaling divides
by that exact probability (the expectation of each entry is preserved exactly). The bits come from
a counter-based hash of the entry's position keyed per expert by the candidate's generator, so a
mask depends on the seed and the densities only (not on the chunk size or the weights' values).

TIES and DARE run as one fused pass per chunk (``fused.py``): each is a single plain torch function
over a chunk — trim or drop, weight, elect, disjoint mean — compiled into one loop for large
models and run as eager ops for small ones, with the same float32 bits either way on CPUs. The last
step, base + λ·x, is rounded as a multiply and then an add (the eager kernels before them used
``add(alpha=λ)``, one fused rounding on AVX2 CPUs): with λ ≠ 1 an entry may differ from theirs by
one unit in the last place of |base| + |λ·x|; with λ = 1 the results are the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from evomerge.merge.fused import FusedKernel
from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor, chunk_bounds, combine_, shrink_bounds, work_step

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


def _xorshift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """``z ^ (z >>> k)`` on int32 (a logical shift: the arithmetic one, then the sign bits masked off)."""
    return z ^ ((z >> k) & ((1 << (32 - k)) - 1))


def _dare_keys(m: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One key per expert from the candidate's generator (keys and counters stay below 2³⁰); the
    materializer's is a CPU generator, so the keys, and with them the masks, are the same on every
    device."""
    keys = torch.randint(0, 1 << 30, (m,), generator=generator, device=generator.device, dtype=torch.int32)
    return keys.to(device)


def _keep_masks(drop: torch.Tensor, start: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``[m, count]``: 1 where expert ``i`` keeps entry ``start + j``, else 0 (in ``dtype``).

    ``drop`` holds the experts' keys (row 0) and the largest random byte each keeps (row 1; −1 keeps
    nothing); ``start`` is a 0-d int64 tensor (a compiled kernel then takes it as data instead of
    specializing on it). Entry ``p``'s byte is byte ``p mod 4`` (from the least significant) of
    lowbias32(``p // 4 + key``), C. Wellons' 32-bit integer hash: a mask depends on the key and
    the position only, is the same for any chunk size and is drawn the same way on every device.
    Each entry hashes its own word: compiled, that is a few integer ops in registers, cheaper than
    storing one hash per 4 entries and reading it back.
    """
    positions = torch.arange(count, dtype=torch.int64, device=drop.device) + start
    z = (positions >> 2).to(torch.int32) + drop[0].unsqueeze(1)
    z = _xorshift_right(z, 16) * _LOWBIAS_M1
    z = _xorshift_right(z, 15) * _LOWBIAS_M2
    z = _xorshift_right(z, 16)
    random_bytes = (z >> ((positions & 3) * 8).to(torch.int32)) & 255
    return (random_bytes <= drop[1].unsqueeze(1)).to(dtype)


# --- the two per-chunk kernels: a (masked) weighted sum, and TIES' sign consensus -------------------
# Scalars travel in small tensors (a compiled call then checks a few inputs, not one per number):
# ``params`` is in the rows' dtype widened to at least float32, as eager ops take Python scalars.
# Masks multiply as 0/1 floats rather than select: on CPUs eager ``torch.where`` and products with
# booleans run as scalar loops, ten to forty times slower than a float product.


def _dare_sum_chunk(
    out: torch.Tensor,
    rows: torch.Tensor,
    ref: torch.Tensor,
    coefs: torch.Tensor,
    drop: torch.Tensor,
    start: torch.Tensor,
) -> None:
    """``out = base + Σ_i c_i · keep_i · τ_i`` on one chunk (DARE without consensus)."""
    keep = _keep_masks(drop, start, out.shape[0], rows.dtype)
    merged = ref
    for i in range(rows.shape[0]):
        merged = merged + rows[i] * keep[i] * coefs[i]
    out.copy_(merged)


def _consensus_chunk(
    out: torch.Tensor,
    rows: torch.Tensor,
    ref: torch.Tensor,
    params: torch.Tensor,
    bounds: torch.Tensor | None,
    drop: torch.Tensor | None,
    start: torch.Tensor | None,
    normalize: bool,
) -> None:
    """TIES' trim (or DARE's drop), sign election and disjoint mean on one chunk.

    ``params`` holds the scales of the task vectors, the weights, then λ; ``bounds`` are the trim's
    (see :func:`shrink_bounds`), ``drop`` DARE's (see :func:`_keep_masks`). With ``W_i`` the weighted,
    sparsified task vectors and ``M = ±1`` the elected sign (a zero sum elects +), ``max(M·W_i, 0)``
    is ``|W_i|`` where expert ``i`` agrees and 0 elsewhere (a trimmed or dropped entry agrees with
    nothing), so the agreeing sum is ``M · Σ_i max(M·W_i, 0)`` and the agreeing weights are
    ``Σ_i w_i · [max(M·W_i, 0) > 0]``; sums run in expert order.
    """
    m = rows.shape[0]
    keep = None if drop is None or start is None else _keep_masks(drop, start, out.shape[0], rows.dtype)
    weighted = []
    for i in range(m):
        row = rows[i]
        if bounds is not None:  # hardshrink: zero |τ| ≤ bound, i.e. keep |τ| ≥ the threshold
            row = row * (row.abs() > bounds[i]).to(row.dtype)
        row = row * params[i]
        if keep is not None:
            row = row * keep[i]
        weighted.append(row)
    total = weighted[0]
    for row in weighted[1:]:
        total = total + row
    elected = (total >= 0).to(total.dtype) * 2 - 1
    agreeing = [(row * elected).clamp_min(0) for row in weighted]
    merged = agreeing[0]
    for row in agreeing[1:]:
        merged = merged + row
    if normalize:
        divisor = (agreeing[0] > 0).to(total.dtype) * params[m]
        for i in range(1, m):
            divisor = divisor + (agreeing[i] > 0).to(total.dtype) * params[m + i]
        merged = merged / (divisor + (divisor == 0).to(divisor.dtype))  # no agreeing weight: divide by 1
    out.copy_(ref + params[2 * m] * (merged * elected))


_DARE_SUM = FusedKernel(_dare_sum_chunk)
_CONSENSUS = FusedKernel(_consensus_chunk)


def _scalars(values: Sequence[float], rows: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.promote_types(rows.dtype, torch.float32), device=rows.device)


def _drop(levels: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """DARE's per-expert keys (from the candidate's generator) and largest kept bytes, as ``[2, m]``."""
    keys = _dare_keys(len(levels), generator, device)
    return torch.stack([keys, torch.tensor([lv - 1 for lv in levels], device=device, dtype=torch.int32)])


def _masked_sum_(
    out: torch.Tensor, tensor: ResidentTensor, coefs: Sequence[float], levels: Sequence[int], ctx: TensorContext
) -> None:
    """``out = base + Σ_i c_i · keep_i · τ_i`` (DARE without consensus), one fused pass."""
    rows, ref, flat_out = tensor.flat_stack(), tensor.flat_reference(), out.view(-1)
    assert ref is not None
    m, n = tensor.n_models, tensor.numel
    drop = _drop(levels, ctx.generator, rows.device)
    coef_values = _scalars(coefs, rows)
    kernel, step = _DARE_SUM.plan(ctx.total, work_step(ctx.chunk, m))
    for s, e in chunk_bounds(n, step):
        start = torch.tensor(s, dtype=torch.int64, device=rows.device)
        kernel(flat_out[s:e], rows[:, s:e], ref[s:e], coef_values, drop, start)


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
    """TIES' trim (or DARE's drop), sign election and disjoint mean: one fused pass (see
    :func:`_consensus_chunk`)."""
    rows, ref, flat_out = tensor.flat_stack(), tensor.flat_reference(), out.view(-1)
    assert ref is not None
    m, n = tensor.n_models, tensor.numel
    device, dtype = rows.device, rows.dtype
    bounds = None
    if any(t is not None for t in thresholds):  # an untrimmed row gets a bound no |τ| is under
        bounds = shrink_bounds([-1.0 if t is None else t for t in thresholds], dtype, device)
    drop = None if levels is None else _drop(levels, ctx.generator, device)
    params = _scalars([*scales, *weights, lam], rows)
    kernel, step = _CONSENSUS.plan(ctx.total, work_step(ctx.chunk, m))
    for s, e in chunk_bounds(n, step):
        start = None if drop is None else torch.tensor(s, dtype=torch.int64, device=device)
        kernel(flat_out[s:e], rows[:, s:e], ref[s:e], params, bounds, drop, start, normalize)


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


# the four configurations, named by their declarations (``declarations.py``)
task_arithmetic_kernel = _make_kernel(_Variant(None, False))
ties_kernel = _make_kernel(_Variant("magnitude", True))
dare_linear_kernel = _make_kernel(_Variant("random", False))
dare_ties_kernel = _make_kernel(_Variant("random", True))
