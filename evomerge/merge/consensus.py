"""TALL masks and Consensus merging on top of task arithmetic and TIES.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024,
arXiv 2405.07813). Given the task vectors τ_t and a merged multi-task vector τ_MTL, task t's
TALL mask keeps the entries where τ_t is at least λ_t times as far from zero as τ_MTL is from it:

    m_t = 1[ |τ_t| ≥ λ_t · |τ_MTL − τ_t| ]

Consensus merging keeps only the entries at least k masks agree on — k = 2 drops the "selfish"
weights (used by one task only) and the "catastrophic" ones (used by none) — and merges

    θ = θ_base + λ · (m_consensus ⊙ τ_MTL),   m_consensus = 1[ Σ_t m_t ≥ k ].

Choices made: τ_MTL is the registered operator's own merge with ``lambda`` = 1 (task arithmetic
``Σ_i w_i τ_i``, or TIES' disjoint mean), so the method's ``lambda`` scales the masked vector as
the paper's α does; the masks compare the *unweighted* τ_t with τ_MTL, as the paper writes them
(a weight changes τ_MTL, and through it the masks). λ_t is one value per expert (default 0.4, the
middle of the paper's validation grid 0.2–0.6); k is an integer gene from 1 to the number of
experts (default 2, the paper's choice). With λ_t = 0 every mask is full and k = 1 gives the
unmasked merge.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from evomerge.merge.kernel import Kernel, TensorContext
from evomerge.merge.resident import ResidentTensor, chunk_bounds, work_step
from evomerge.merge.task_arithmetic import task_arithmetic_kernel, ties_kernel


def _consensus_kernel(inner: Kernel):
    def kernel(
        out: torch.Tensor,
        tensor: ResidentTensor,
        params: Mapping[str, Sequence[float] | float],
        options: Mapping[str, bool],
        ctx: TensorContext,
    ) -> None:
        if tensor.reference is None:
            raise ValueError(f"{tensor.name}: consensus merging needs a base model")
        # out = base + τ_MTL, written by the operator it refines (its own chunked kernels)
        inner(out, tensor, {**params, "lambda": 1.0}, options, ctx)
        lam = float(params["lambda"])  # type: ignore[arg-type]
        k = int(round(float(params["k"])))  # type: ignore[arg-type]
        mask_lambdas = torch.tensor(
            [float(x) for x in params["mask_lambda"]],  # type: ignore[union-attr]
            dtype=out.dtype, device=out.device,
        ).view(-1, 1)
        rows, ref, flat = tensor.flat_stack(), tensor.flat_reference(), out.view(-1)
        assert ref is not None
        m, n = tensor.n_models, tensor.numel
        step = work_step(ctx.chunk, m)
        width = min(step, n)
        mtl = ctx.scratch.get("consensus_mtl", (width,), out.dtype, out.device)
        gap = ctx.scratch.get("consensus_gap", (m, width), out.dtype, out.device)
        votes = ctx.scratch.get("consensus_votes", (m, width), out.dtype, out.device)
        count = ctx.scratch.get("consensus_count", (width,), out.dtype, out.device)
        for s, e in chunk_bounds(n, step):
            c = e - s
            d, g, v, cnt = mtl[:c], gap[:, :c], votes[:, :c], count[:c]
            torch.sub(flat[s:e], ref[s:e], out=d)  # τ_MTL
            torch.sub(d.unsqueeze(0), rows[:, s:e], out=g)
            g.abs_().mul_(mask_lambdas)  # λ_t · |τ_MTL − τ_t|
            torch.abs(rows[:, s:e], out=v)
            torch.ge(v, g, out=v)  # m_t
            torch.sum(v, dim=0, out=cnt)
            cnt.ge_(k)  # m_consensus
            d.mul_(cnt)
            torch.add(ref[s:e], d, alpha=lam, out=flat[s:e])

    return kernel


# named by their declarations (``declarations.py``)
consensus_task_arithmetic_kernel = _consensus_kernel(task_arithmetic_kernel)
consensus_ties_kernel = _consensus_kernel(ties_kernel)
