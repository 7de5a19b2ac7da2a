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

from evomerge.merge.method import MergeMethod, ParamSpec, TensorContext
from evomerge.merge.resident import ResidentTensor, chunk_bounds


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
    thresholds: list[float | None] = [None] * m
    if factor == "A":
        for row, alpha in enumerate(alphas):
            keep = math.ceil(min(max(alpha, 0.0), 1.0) * n)
            if keep < n:
                thresholds[row] = float("inf") if keep == 0 else tensor.magnitude_threshold(row, keep)
    flat_out = out.view(-1)
    rows = tensor.flat_stack()
    for s, e in chunk_bounds(n, ctx.chunk):
        out_c = flat_out[s:e]
        out_c.zero_()
        for row, (beta, thr) in enumerate(zip(betas, thresholds)):
            if beta == 0.0:
                continue
            x = rows[row, s:e]
            if thr is None:
                out_c.add_(x, alpha=beta)
            else:
                out_c.add_(x * (x.abs() >= thr), alpha=beta)


LORA_COMPOSE = MergeMethod(
    name="lora_compose",
    kernel=lora_compose_kernel,
    params=(
        ParamSpec("alpha", per_model=True, default=1.0, low=0.0, high=1.0, doc="fraction of LoRA-A entries kept"),
        ParamSpec("beta", per_model=True, default=None, low=-1.5, high=1.5, doc="signed scale of A and B (default 1/N)"),
    ),
    doc="Evo-Merging: sparsify LoRA-A by magnitude, scale A and B by signed β, sum.",
)
