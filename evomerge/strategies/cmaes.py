"""CMA-ES over a space's unit cube, through pycma.

Hansen's CMA-ES as used for merge recipes by Akiba et al. ("Evolutionary Optimization of Model
Merging Recipes", 2024) and mergekit-evolve: bounds [0, 1] from the space, σ0 = 1/6 of the range,
population 4 + ⌊3 ln d⌋. pycma is generational, so ``ask`` hands out one generation and returns
nothing more until every member has been told; results may arrive in any order. pycma draws from
numpy's global RNG by default; each strategy gets its own ``RandomState`` so populations in one
process never disturb each other.
"""

from __future__ import annotations

import math
import pickle
import warnings
from typing import Any

import numpy as np
from pydantic import Field

from evomerge.candidates import Candidate, Evaluation
from evomerge.strategies.base import SearchSpec, Strategy, StrategyOptions


def _import_cma():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycma warns when matplotlib is missing
        import cma
    return cma


class CMAESOptions(StrategyOptions):
    sigma0: float = Field(default=1.0 / 6.0, gt=0, description="initial step size in unit-cube coordinates")
    popsize: int | None = Field(default=None, ge=2, description="default 4 + floor(3 ln d)")
    separable: bool = Field(default=False, description="diagonal covariance, for high dimensions")


class CMAES(Strategy):
    Options = CMAESOptions

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: CMAESOptions) -> None:
        super().__init__(population, spec, seed, options)
        dim = spec.dim
        if dim < 1:
            raise ValueError("CMA-ES needs at least one searched gene")
        cma = _import_cma()
        popsize = options.popsize or 4 + int(3 * math.log(dim))
        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "popsize": popsize,
            "randn": np.random.RandomState(seed).randn,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "seed": seed + 1,  # pycma reseeds the global RNG with this; restored below
        }
        if options.separable:
            opts["CMA_diagonal"] = True
        global_state = np.random.get_state()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._es = cma.CMAEvolutionStrategy(np.clip(self.x0, 0.0, 1.0).tolist(), options.sigma0, opts)
        finally:
            np.random.set_state(global_state)
        self._generation: list[np.ndarray] = []
        self._issued = 0
        self._losses: dict[int, float] = {}

    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        if not self._generation:
            if self._es.stop():
                return []
            self._generation = [np.asarray(x, dtype=np.float64) for x in self._es.ask()]
            self._issued = 0
            self._losses = {}
        take = min(n, len(self._generation) - self._issued)
        out = [(self._generation[self._issued + i], (), self._issued + i) for i in range(take)]
        self._issued += take
        return out

    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        self._losses[tag] = -fitness  # pycma minimises; the tag is the generation member
        if len(self._losses) == len(self._generation):
            finite = [v for v in self._losses.values() if math.isfinite(v)]
            worst = (max(finite) + 1.0) if finite else 0.0
            losses = [self._losses[i] if math.isfinite(self._losses[i]) else worst for i in range(len(self._generation))]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._es.tell([x.tolist() for x in self._generation], losses)
            self._generation = []
            self._issued = 0
            self._losses = {}

    def stop(self) -> dict[str, Any]:
        if self._generation:
            return {}
        return {str(k): v for k, v in self._es.stop().items()}

    def _state(self) -> Any:
        return {
            "es": pickle.dumps(self._es),
            "generation": self._generation,
            "issued": self._issued,
            "losses": dict(self._losses),
        }

    def _load_state(self, state: Any) -> None:
        self._es = pickle.loads(state["es"])
        self._generation = list(state["generation"])
        self._issued = state["issued"]
        self._losses = dict(state["losses"])
