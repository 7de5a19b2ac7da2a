"""PCB merging: balance the competition between parameters, drop the weakest, rescale, combine.

Du et al., "Parameter Competition Balancing for Model Merging" (NeurIPS 2024, arXiv 2410.02396).
For N task vectors τ_i (element-wise products ⊙, Norm = min–max normalisation to [0, 1]):

* intra-balancing (how much an entry matters within its task):
  β_intra,i = Softmax(N · Norm(τ_i ⊙ τ_i));
* inter-balancing (how much it agrees with the other tasks):
  β_inter,i = Σ_j Softmax(Norm(τ_i ⊙ τ_j));
* β_i = β_intra,i ⊙ β_inter,i; each task keeps the entries of its highest β_i (the rest get
  β̂_i = 0), and the kept entries are combined by their scores:
  θ = θ_base + λ · Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i  (0 where no task keeps an entry).

Choices made: scores are computed per tensor (the authors flatten the whole model; per tensor lets
Softmax compare the entries of one layer); ``density`` is the fraction of each task's entries
*kept* (the paper's ratio, default 0.2 as TIES' usual top 20 %), ties at the threshold are kept;
the authors' code also clips the magnitudes' extreme quantiles before scoring, which the paper does
not describe and we do not do. A constant row normalises to 0 rather than dividing by zero.

The kernel streams over cache-sized chunks: one pass finds each product's min and max, one the
softmax normalisers, one per task its score threshold (the only full-length buffer: one task's
scores, for ``kthvalue``), and one writes the merge — so a tensor's transient memory is about one
copy of it, not N² of them. Scores are computed in float32 (float64 for float64 models).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor, chunk_bounds, work_step


class _Scores:
    """β_i = β_intra,i ⊙ β_inter,i on any chunk of the task vectors, once the whole-tensor
    statistics (each product's min and max, each softmax's normaliser) are known."""

    def __init__(self, rows: torch.Tensor, step: int, wide: torch.dtype) -> None:
        self.rows, self.step, self.wide = rows, step, wide
        m = rows.shape[0]
        self.m = m
        lo = torch.full((m, m), math.inf, dtype=wide, device=rows.device)
        hi = torch.full((m, m), -math.inf, dtype=wide, device=rows.device)
        for s, e in chunk_bounds(rows.shape[1], step):
            tau = rows[:, s:e].to(wide)
            for i in range(m):
                products = tau[i] * tau  # τ_i ⊙ τ_j for every j
                lo[i] = torch.minimum(lo[i], products.amin(dim=1))
                hi[i] = torch.maximum(hi[i], products.amax(dim=1))
        span = hi - lo
        self.lo, self.span = lo, torch.where(span > 0, span, torch.ones_like(span))
        # softmax(v) = exp(v − max v) / Σ exp(v − max v); Norm ∈ [0, 1], so max v is N (intra) or 1
        self.intra_sum = torch.zeros(m, dtype=wide, device=rows.device)
        self.inter_sum = torch.zeros((m, m), dtype=wide, device=rows.device)
        for s, e in chunk_bounds(rows.shape[1], step):
            tau = rows[:, s:e].to(wide)
            for i in range(m):
                norm = self._norm(i, tau[i] * tau)
                self.inter_sum[i] += torch.exp(norm - 1.0).sum(dim=1)
                self.intra_sum[i] += torch.exp(m * (norm[i] - 1.0)).sum()

    def _norm(self, i: int, products: torch.Tensor) -> torch.Tensor:
        return (products - self.lo[i].unsqueeze(1)) / self.span[i].unsqueeze(1)

    def chunk(self, s: int, e: int, i: int) -> torch.Tensor:
        """β_i on entries ``[s, e)``."""
        tau = self.rows[:, s:e].to(self.wide)
        norm = self._norm(i, tau[i] * tau)
        intra = torch.exp(self.m * (norm[i] - 1.0)) / self.intra_sum[i]
        inter = (torch.exp(norm - 1.0) / self.inter_sum[i].unsqueeze(1)).sum(dim=0)
        return intra * inter


def pcb_kernel(
    out: torch.Tensor,
    tensor: ResidentTensor,
    params: Mapping[str, Sequence[float] | float],
    options: Mapping[str, bool],
    ctx: TensorContext,
) -> None:
    if tensor.reference is None:
        raise ValueError(f"{tensor.name}: PCB merging needs a base model")
    densities = [float(d) for d in params["density"]]  # type: ignore[union-attr]
    lam = float(params["lambda"])  # type: ignore[arg-type]
    rows, ref, flat = tensor.flat_stack(), tensor.flat_reference(), out.view(-1)
    assert ref is not None
    m, n = tensor.n_models, tensor.numel
    wide = torch.promote_types(rows.dtype, torch.float32)
    step = work_step(ctx.chunk, m * m)
    scores = _Scores(rows, step, wide)
    thresholds: list[float] = []  # keep β_i ≥ threshold (inf: keep nothing, -inf: keep all)
    beta: torch.Tensor | None = None  # one task's scores; freed with the call, not kept as scratch
    for i, density in enumerate(densities):
        keep = min(n, max(0, math.floor(density * n)))
        if keep in (0, n):
            thresholds.append(math.inf if keep == 0 else -math.inf)
            continue
        beta = torch.empty(n, dtype=wide, device=rows.device) if beta is None else beta
        for s, e in chunk_bounds(n, step):
            beta[s:e] = scores.chunk(s, e, i)
        thresholds.append(float(torch.kthvalue(beta, n - keep + 1).values))
    for s, e in chunk_bounds(n, step):
        tau = rows[:, s:e].to(wide)
        kept = torch.stack([scores.chunk(s, e, i) for i in range(m)])
        kept.masked_fill_(kept < torch.tensor(thresholds, dtype=wide, device=rows.device).unsqueeze(1), 0.0)
        total = kept.sum(dim=0)
        merged = (kept * tau).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))
        flat[s:e] = ref[s:e].to(wide) + lam * merged
