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

Choices made: scores are computed per tensor (the authors flatten the whole model; per tensor keeps
a worker's transient memory to a few copies of its largest tensor and lets Softmax compare entries
of one layer); ``density`` is the fraction of each task's entries *kept* (the paper's ratio, default
0.2 as TIES' usual top 20 %), ties at the threshold are kept; the authors' code also clips the
magnitudes' extreme quantiles before scoring, which the paper does not describe and we do not do.
A constant row normalises to 0 rather than dividing by zero. The scores are computed in float32 (or
float64 for float64 models).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from evomerge.merge.method import MergeMethod, ParamSpec, TensorContext
from evomerge.merge.resident import ResidentTensor


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to [0, 1]; a constant row becomes 0."""
    lo = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True) - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def pcb_scores(tau: torch.Tensor) -> torch.Tensor:
    """β_intra ⊙ β_inter for task vectors ``tau`` of shape [N, n] (one row per task)."""
    n_tasks = tau.shape[0]
    intra = torch.softmax(n_tasks * _min_max(tau * tau), dim=1)
    inter = torch.zeros_like(tau)
    for j in range(n_tasks):
        inter += torch.softmax(_min_max(tau * tau[j]), dim=1)
    return intra * inter


def pcb_merge(tau: torch.Tensor, densities: Sequence[float]) -> torch.Tensor:
    """Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i with each row's top ``density`` fraction of scores kept."""
    scores = pcb_scores(tau)
    n = tau.shape[1]
    for i, density in enumerate(densities):
        keep = min(n, max(0, math.floor(density * n)))
        if keep == 0:
            scores[i].zero_()
        elif keep < n:
            threshold = torch.kthvalue(scores[i], n - keep + 1).values
            scores[i].masked_fill_(scores[i] < threshold, 0.0)
    total = scores.sum(dim=0)
    merged = (scores * tau).sum(dim=0)
    return merged / torch.where(total > 0, total, torch.ones_like(total))


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
    wide = torch.promote_types(tensor.stack.dtype, torch.float32)
    merged = pcb_merge(tensor.flat_stack().to(wide), densities)
    flat_ref = tensor.flat_reference()
    assert flat_ref is not None
    out.view(-1).copy_(torch.add(flat_ref.to(wide), merged, alpha=lam))


PCB = MergeMethod(
    name="pcb",
    kernel=pcb_kernel,
    params=(
        ParamSpec("density", per_model=True, default=0.2, low=0.05, high=1.0, doc="fraction of each task's entries kept by score"),
        ParamSpec("lambda", per_model=False, default=1.0, low=0.0, high=2.0, doc="scale of the combined task vector"),
    ),
    needs_base=True,
    doc="PCB: score entries by intra- and inter-task balance, drop the lowest, combine by score.",
)
