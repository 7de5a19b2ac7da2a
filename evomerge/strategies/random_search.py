"""Uniform random search over a space's unit cube: the baseline every other strategy must beat.

Bergstra and Bengio ("Random Search for Hyper-Parameter Optimization", JMLR 2012) show it is a
strong baseline when few genes matter. It starts from the configured init (``x0``) and the
space's seeds, so it is compared with the model-based strategies on equal terms, then draws
from its own ``np.random.Generator``: populations in one process never disturb each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from evomerge.records import Candidate, Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies.base import Strategy, StrategyOptions


class RandomSearchOptions(StrategyOptions):
    include_x0: bool = Field(default=True, description="evaluate the space's starting point before the seeds and samples")


class RandomSearch(Strategy):
    Options = RandomSearchOptions

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: RandomSearchOptions) -> None:
        super().__init__(population, spec, seed, options)
        if not spec.bounded:
            raise ValueError("random search samples the unit cube; this space is unbounded")
        start = [self.x0] if options.include_x0 else []
        self._queue = [spec.snap(np.clip(np.asarray(g, dtype=np.float64), 0.0, 1.0)) for g in (*start, *spec.seeds)]
        self._issued = 0  # how many of the queue were handed out
        self._rng = np.random.default_rng(seed)

    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        queued = self._queue[self._issued : self._issued + n]
        self._issued += len(queued)
        drawn = [self.spec.snap(x) for x in self._rng.random((n - len(queued), self.dim))]
        return [(g, (), None) for g in queued + drawn]

    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        """Nothing to learn: the base class keeps the best."""

    def _state(self) -> Any:
        return {"issued": self._issued, "rng": self._rng.bit_generator.state}

    def _load_state(self, state: Any) -> None:
        self._issued = state["issued"]
        self._rng.bit_generator.state = state["rng"]
