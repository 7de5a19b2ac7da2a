"""AdaMerging: merge coefficients learned by gradient descent on the merged model's prediction entropy.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024, arXiv
2310.02575): task-wise or layer-wise coefficients λ of task arithmetic, θ = θ_0 + Σ_k λ_k^l τ_k^l,
are trained with Adam to minimise the Shannon entropy of the merged model's predictions on
unlabelled inputs — a surrogate for the loss that needs no labels.

Here the coefficients are the space's genes (``per_model`` = task-wise, ``per_layer_group`` =
layer-wise; ``linear`` or ``task_arithmetic``), and one step is one evaluation: the white-box
worker materializes the candidate differentiably (``evomerge.workers.entropy_gradient``) and returns the
entropy and its gradient with respect to the unit-cube genome as the metrics ``loss`` and
``loss_gradient``; this strategy then takes an Adam step and asks the next point. The fitness of
each step is scored as usual, so the run's best is the best step by fitness — a gradient-based
baseline on the same space and budget as the evolutionary searches.

Choices made: Adam runs in unit-cube coordinates (``lr`` 0.05 moves a gene by about 1/20 of its
range per step; the paper's 1e-3 on raw coefficients is for 500 steps), and steps are clipped to
the cube; discrete genes stay at their starting level (entropy has no gradient there); a failed
step goes back halfway towards the last point that scored, and ``max_failures`` failures in a row
stop the population.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from evomerge.records import Candidate, Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies.base import Requirements, Strategy, StrategyOptions

ADAM_EPS = 1e-8


class AdaMergingOptions(StrategyOptions):
    lr: float = Field(default=0.05, gt=0, description="Adam step size in unit-cube coordinates")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="Adam's first-moment decay")
    beta2: float = Field(default=0.999, ge=0, lt=1, description="Adam's second-moment decay")
    max_failures: int = Field(default=5, ge=1, description="failed steps in a row that stop the population")


class AdaMerging(Strategy):
    Options = AdaMergingOptions

    @classmethod
    def requires(cls, options: StrategyOptions) -> Requirements:
        return Requirements(gradient=True)

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: AdaMergingOptions) -> None:
        super().__init__(population, spec, seed, options)
        if not spec.bounded:
            raise ValueError("adamerging learns unit-cube merge coefficients; this space is unbounded")
        self._movable = np.ones(spec.dim, dtype=bool)
        for gene in spec.discrete:
            self._movable[gene.start : gene.stop] = False
        self._position = spec.snap(np.clip(self.x0, 0.0, 1.0))
        self._last_good = self._position.copy()
        self._m = np.zeros(spec.dim)
        self._v = np.zeros(spec.dim)
        self._steps = 0
        self._failures = 0

    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        if self._outstanding or self._failures >= self.options.max_failures:  # type: ignore[attr-defined]
            return []  # one step at a time: the next point needs this one's gradient
        return [(self._position.copy(), (), None)]

    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        if not math.isfinite(fitness):
            self._failures += 1
            self._position = self.spec.snap((self._position + self._last_good) / 2)
            return
        gradient = evaluation.metrics.get("loss_gradient")
        if gradient is None or len(gradient) != self.dim:
            raise ValueError(
                f"{self.population}: adamerging needs the gradient its white-box worker computes"
                " (metrics['loss_gradient']), one value per gene"
            )
        self._failures = 0
        self._last_good = candidate.genome.copy()
        self._position = self._adam_step(candidate.genome, np.asarray(gradient, dtype=np.float64))

    def _adam_step(self, genome: np.ndarray, gradient: np.ndarray) -> np.ndarray:
        o: AdaMergingOptions = self.options  # type: ignore[assignment]
        g = np.where(self._movable & np.isfinite(gradient), gradient, 0.0)
        self._steps += 1
        self._m = o.beta1 * self._m + (1 - o.beta1) * g
        self._v = o.beta2 * self._v + (1 - o.beta2) * g * g
        m_hat = self._m / (1 - o.beta1**self._steps)
        v_hat = self._v / (1 - o.beta2**self._steps)
        return np.clip(genome - o.lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS), 0.0, 1.0)

    def stop(self) -> dict[str, Any]:
        if self._failures >= self.options.max_failures:  # type: ignore[attr-defined]
            return {"failures": f"{self._failures} failed steps in a row"}
        return {}

    def _state(self) -> Any:
        return {
            "position": self._position.copy(),
            "last_good": self._last_good.copy(),
            "m": self._m.copy(),
            "v": self._v.copy(),
            "steps": self._steps,
            "failures": self._failures,
        }

    def _load_state(self, state: Any) -> None:
        self._position = np.array(state["position"])
        self._last_good = np.array(state["last_good"])
        self._m = np.array(state["m"])
        self._v = np.array(state["v"])
        self._steps = state["steps"]
        self._failures = state["failures"]
