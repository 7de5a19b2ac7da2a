"""Evo-Merging's composition of LoRA adapters: sparsity-based denoising and sign-aware scaling.

Chen et al., "Black-box Model Merging for Language-Model-as-a-Service with Massive Model
Repositories" (arXiv 2509.12951, §3; authors' ``BMM_code``). For adapters i with factors
(A_i, B_i) on every target module:

    A = Σ_i β_i · S_{α_i}(A_i),   B = Σ_i β_i · B_i

where S_a keeps the ⌈a·n⌉ largest-magnitude entries of a tensor (per tensor, only the A factors
are sparsified: the paper's "asymmetric" denoising) and β_i ∈ [−1.5, 1.5] may be negative. The
paper's stage 1 is this with β_i = 1/N; its stage 2 fixes α and searches β. The result keeps rank r,
so it is served like any rank-r adapter. Tensors are recognised by PEFT's key names (``lora_A`` /
``lora_B``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor, chunk_bounds, shrink_bound


def lora_factor(name: str) -> str:
    """``"A"`` or ``"B"`` from a PEFT tensor name; a clear error for anything else."""
    if "lora_A" in name or "lora_embedding_A" in name:
        return "A"
    if "lora_B" in name or "lora_embedding_B" in name:
        return "B"
    raise ValueError(
        f"{name}: lora_compose merges LoRA adapters and expects only lora_A / lora_B tensors"
    )


def lora_compose_kernel(
    out: torch.Tensor,
    tensor: ResidentTensor,
    params: Mapping[str, Sequence[float] | float],
    options: Mapping[str, bool],
    ctx: TensorContext,
) -> None:
    if tensor.reference is not None:
        raise ValueError(f"{tensor.name}: lora_compose merges adapters, not task vectors of a base")
    betas = [float(b) for b in params["beta"]]  # type: ignore[union-attr]
    alphas = [float(a) for a in params["alpha"]]  # type: ignore[union-attr]
    factor = lora_factor(tensor.name)
    m, n = tensor.n_models, tensor.numel
    keeps: list[int | None] = [None] * m
    if factor == "A":
        for row, alpha in enumerate(alphas):
            keep = math.ceil(min(max(alpha, 0.0), 1.0) * n)
            if keep < n and betas[row] != 0.0:
                keeps[row] = keep
    found = tensor.magnitude_thresholds(
        [k if k else None for k in keeps], chunk=ctx.chunk, scratch=ctx.scratch
    )
    thresholds = [None if k is None else (math.inf if k == 0 else t) for k, t in zip(keeps, found)]
    flat_out = out.view(-1)
    rows = tensor.flat_stack()
    bounds = [None if t is None else shrink_bound(t, rows.dtype) for t in thresholds]
    active = [(row, beta, bound) for row, (beta, bound) in enumerate(zip(betas, bounds)) if beta != 0.0]
    trimmed = ctx.scratch.get("lora_trimmed", (min(ctx.chunk, n),), rows.dtype, rows.device)
    for s, e in chunk_bounds(n, ctx.chunk):
        out_c = flat_out[s:e]
        if not active:
            out_c.zero_()
            continue
        for j, (row, beta, bound) in enumerate(active):
            x = rows[row, s:e]
            if bound is not None:  # S_α: hardshrink keeps exactly |x| ≥ threshold
                x = torch.hardshrink(x, bound, out=out_c if j == 0 else trimmed[: e - s])
            if j == 0:
                torch.mul(x, beta, out=out_c)
            else:
                out_c.add_(x, alpha=beta)
