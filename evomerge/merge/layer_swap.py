"""Layer swapping: each group of layers is taken whole from one expert.

Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language Models"
(ICLR 2025, arXiv 2410.01335) re-compose a model from two experts of one base: the top and bottom
transformer layers come from a language expert, the middle ones from a math expert. Here the
choice is a search gene: per tensor group (``granularity: per_layer_group`` gives one choice per
group of consecutive layers, embeddings joining the first group and the head the last), an integer
``expert`` from 0 to N − 1 names the expert that supplies it — a categorical gene, which the
strategies handle as documented in :class:`evomerge.space.genes.GeneRange`.

Choice made: the paper's "transition zones" (layers averaged between the two experts) are not a
separate gene; a searched ``linear`` merge per layer group covers them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor, combine_


def layer_swap_kernel(
    out: torch.Tensor,
    tensor: ResidentTensor,
    params: Mapping[str, Sequence[float] | float],
    options: Mapping[str, bool],
    ctx: TensorContext,
) -> None:
    choice = int(round(float(params["expert"])))  # type: ignore[arg-type]
    if not 0 <= choice < tensor.n_models:
        raise ValueError(f"{tensor.name}: expert {choice} does not exist (there are {tensor.n_models})")
    coefs = [0.0] * tensor.n_models
    coefs[choice] = 1.0
    combine_(out, tensor, coefs, ctx.chunk)
