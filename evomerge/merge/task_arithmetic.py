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
by that exact probability (the expectation of each entry is preserved exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from evomerge.merge.method import MergeMethod, OptionSpec, ParamSpec, TensorContext
from evomerge.merge.resident import ResidentTensor, chunk_bounds

DARE_LEVELS = 256
WEIGHT_SUM_EPS = 1e-8


@dataclass(frozen=True)
class _Variant:
    sparsify: str | None  # None, "magnitude" or "random"
    consensus: bool


def _magnitude_thresholds(tensor: ResidentTensor, densities: Sequence[float]) -> list[float | None]:
    thresholds: list[float | None] = []
    n = tensor.numel
    for row, density in enumerate(densities):
        if density >= 1.0:
            thresholds.append(None)
            continue
        keep = int(density * n)
        thresholds.append(float("inf") if keep <= 0 else tensor.magnitude_threshold(row, keep))
    return thresholds


def _dare_levels(densities: Sequence[float]) -> list[int]:
    """Keep decisions compare a random byte with this level; DARE_LEVELS means keep everything."""
    return [DARE_LEVELS if d >= 1.0 else int(round(max(d, 0.0) * DARE_LEVELS)) for d in densities]


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
            thresholds = _magnitude_thresholds(tensor, densities)
        elif variant.sparsify == "random":
            levels = _dare_levels(densities)
            rescale = options.get("rescale", False)
            scales = [
                0.0 if lv == 0 else (w * DARE_LEVELS / lv if rescale else w)
                for w, lv in zip(weights, levels)
            ]
        normalize = options.get("normalize", False)
        flat_out = out.view(-1)
        ref = tensor.flat_reference()
        rows = tensor.flat_stack()
        device, dtype = rows.device, rows.dtype
        chunk = ctx.chunk
        work = torch.empty((m, min(chunk, tensor.numel)), device=device, dtype=dtype)
        weight_col = torch.tensor(weights, device=device, dtype=dtype).view(m, 1)
        scale_col = torch.tensor(scales, device=device, dtype=dtype).view(m, 1)
        need_mask = any(t is not None for t in thresholds) or any(lv < DARE_LEVELS for lv in levels)
        if need_mask:
            keep = torch.empty((m, work.shape[1]), device=device, dtype=torch.bool)
        if variant.sparsify == "random" and need_mask:
            words = torch.empty((m * work.shape[1] + 7) // 8, device=device, dtype=torch.int64)
            # keep ⇔ byte ≤ level − 1; level 256 (keep all) maps to 255, which every byte satisfies
            max_byte = torch.tensor([max(lv - 1, 0) for lv in levels], device=device, dtype=torch.uint8)
            max_byte = max_byte.view(m, 1)
        if variant.sparsify == "magnitude" and need_mask:
            thr_col = torch.tensor(
                [-1.0 if t is None else t for t in thresholds], device=device, dtype=dtype
            ).view(m, 1)
        plain_divisor = sum(weights)
        plain_divisor = plain_divisor if abs(plain_divisor) >= WEIGHT_SUM_EPS else 1.0
        for s, e in chunk_bounds(tensor.numel, chunk):
            c = e - s
            w_c = work[:, :c]
            torch.mul(rows[:, s:e], scale_col, out=w_c)
            if need_mask:
                k_c = keep[:, :c]
                if variant.sparsify == "magnitude":
                    torch.ge(rows[:, s:e].abs(), thr_col, out=k_c)
                else:
                    nbytes = m * c
                    w_words = words[: (nbytes + 7) // 8]
                    w_words.random_(-(2**63), None, generator=ctx.generator)
                    rand = w_words.view(torch.uint8)[:nbytes].view(m, c)
                    torch.le(rand, max_byte, out=k_c)
                w_c.mul_(k_c)
            if variant.consensus:
                positive = w_c.sum(dim=0) >= 0
                majority = positive.to(dtype) * 2 - 1
                agree = torch.sign(w_c) == majority
                mixed = (w_c * agree).sum(dim=0)
                if normalize:
                    divisor = (weight_col * agree).sum(dim=0)
                    divisor[divisor == 0] = 1
                    mixed.div_(divisor)
            else:
                mixed = w_c.sum(dim=0)
                if normalize:
                    mixed.div_(plain_divisor)
            torch.add(ref[s:e], mixed, alpha=lam, out=flat_out[s:e])

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
