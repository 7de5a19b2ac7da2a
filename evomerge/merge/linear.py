"""Linear merge (model soup): a weighted average of the experts' weights.

Wortsman et al., "Model soups" (ICML 2022); mergekit's ``linear``: with ``normalize`` (default)
the weights are divided by their sum, so (1, 0, …) reproduces expert 0 and equal weights give the
uniform average.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor, combine_

WEIGHT_SUM_EPS = 1e-8


def linear_kernel(
    out: torch.Tensor,
    tensor: ResidentTensor,
    params: Mapping[str, Sequence[float] | float],
    options: Mapping[str, bool],
    ctx: TensorContext,
) -> None:
    weights = [float(w) for w in params["weight"]]  # type: ignore[union-attr]
    total = sum(weights)
    if options["normalize"] and abs(total) > WEIGHT_SUM_EPS:
        weights = [w / total for w in weights]
    combine_(out, tensor, weights, ctx.chunk)
