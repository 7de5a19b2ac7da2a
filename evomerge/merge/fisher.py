"""Fisher-weighted averaging: each expert counts where its own data makes it confident.

Matena and Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022, arXiv
2111.09832): with a Laplace approximation of each expert's posterior whose precision is its
diagonal Fisher information F_i, the merge that maximises their joint likelihood is, element-wise,

    θ = Σ_i λ_i F_i θ_i / Σ_i λ_i F_i

(λ_i the per-expert weights). Equal Fishers give the weighted average, so ``linear`` is the special
case of uninformative Fishers. With a base model the stacks hold task vectors and the same weights
apply to them: θ = θ_base + Σ λ_i F_i τ_i / Σ λ_i F_i (the weights of the base sum to one).

Choices made: F_i is the *empirical* diagonal Fisher (squared gradients of the log-likelihood of the
true labels, averaged over examples — the paper also describes sampling labels from the model),
estimated by the worker once on a few batches of each expert's own data
(``evomerge.workers.fisher_estimate``); entries are floored at ``FISHER_FLOOR`` when the estimate is stored,
so an entry no expert's data touches falls back to the λ-weighted average instead of 0/0.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor, chunk_bounds, work_step

FISHER_FLOOR = 1e-8


def fisher_kernel(
    out: torch.Tensor,
    tensor: ResidentTensor,
    params: Mapping[str, Sequence[float] | float],
    options: Mapping[str, bool],
    ctx: TensorContext,
) -> None:
    if ctx.fisher is None:
        raise ValueError(f"{tensor.name}: Fisher merging needs the experts' Fisher information")
    weights = [float(w) for w in params["weight"]]  # type: ignore[union-attr]
    rows, ref, flat = tensor.flat_stack(), tensor.flat_reference(), out.view(-1)
    fisher = ctx.fisher.view(tensor.n_models, -1)
    m, n = tensor.n_models, tensor.numel
    step = work_step(ctx.chunk, m)
    width = min(step, n)
    num = ctx.scratch.get("fisher_num", (width,), out.dtype, out.device)
    den = ctx.scratch.get("fisher_den", (width,), out.dtype, out.device)
    weighted = ctx.scratch.get("fisher_weighted", (width,), out.dtype, out.device)
    for s, e in chunk_bounds(n, step):
        c = e - s
        nu, de, wf = num[:c], den[:c], weighted[:c]
        nu.zero_()
        de.zero_()
        for i, w in enumerate(weights):
            if w == 0.0:
                continue
            torch.mul(fisher[i, s:e], w, out=wf)  # λ_i F_i
            de.add_(wf)
            nu.addcmul_(wf, rows[i, s:e])
        de.masked_fill_(de == 0, 1.0)  # every weight 0: the base (or zeros)
        torch.div(nu, de, out=flat[s:e])
        if ref is not None:
            flat[s:e].add_(ref[s:e])
