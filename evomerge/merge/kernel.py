"""What a merge kernel is called with: the calling convention every kernel module follows.

Kept apart from the declarations (:mod:`evomerge.merge.method`) because it is written in torch
types: only kernels and the materializer that calls them import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import torch

from evomerge.merge.resident import ResidentTensor, Scratch


@dataclass
class TensorContext:
    """What a kernel may know about the tensor it writes besides the numbers.

    ``offset``/``total`` place the tensor in the flattened parameter set (the M2N2 split point is a
    position in that flat vector); ``generator`` is seeded per candidate and tensor so DARE's drop
    masks are reproducible; ``chunk`` is the number of elements processed per cache-sized step;
    ``scratch`` holds reusable work buffers (a materializer shares one across tensors and candidates).
    """

    name: str
    offset: int
    total: int
    generator: torch.Generator
    chunk: int
    flat_gram: torch.Tensor | None = None
    scratch: Scratch = field(default_factory=Scratch, repr=False)
    fisher: torch.Tensor | None = None
    """The experts' diagonal Fisher information for this tensor, ``[n_models, *shape]`` (Fisher merging)."""


class Kernel(Protocol):
    def __call__(
        self,
        out: torch.Tensor,
        tensor: ResidentTensor,
        params: Mapping[str, Sequence[float] | float],
        options: Mapping[str, bool],
        ctx: TensorContext,
    ) -> None: ...
