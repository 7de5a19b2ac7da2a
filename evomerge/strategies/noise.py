"""M2N2's Gaussian mutation noise, drawn by torch: numpy's normal sampler is ~3× slower, and a
weight-space child needs one draw per parameter.

Its own module so that importing the strategies (``evomerge validate`` reads their options and
requirements) imports no torch: M2N2 imports it when it is built.
"""

from __future__ import annotations

import numpy as np
import torch


class MutationNoise:
    """A seeded stream of float32 normal draws whose state round-trips through a checkpoint."""

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def sample(self, size: int, std: float) -> np.ndarray:
        return torch.empty(size, dtype=torch.float32).normal_(0.0, std, generator=self._generator).numpy()

    def state(self) -> np.ndarray:
        return self._generator.get_state().numpy()

    def set_state(self, state: np.ndarray) -> None:
        self._generator.set_state(torch.from_numpy(np.array(state, dtype=np.uint8)))
