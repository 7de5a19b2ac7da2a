"""MAP: a quadratic surrogate per objective, and the Pareto front found on the surrogates.

Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation" (ICLR 2025, arXiv 2406.07529): evaluate a small design of merge coefficients c,
fit each task's metric with a quadratic M̃_n(c) = ½ cᵀA_n c + b_nᵀc + e_n (a second-order Taylor
expansion around the base, so it is fitted rather than derived), find the Pareto front of the
surrogates with a multi-objective search, and evaluate the front's points.

Here c is the space's unit-cube genome and the objectives are named as for NSGA-II (``"fitness"``
or metrics of the evaluation, e.g. one accuracy per task). Choices made:

* the design is ``x0`` followed by a Latin hypercube (default size: twice the surrogate's number
  of coefficients, at least 10);
* the quadratic is fitted by least squares with a small ridge (1e-6) on every usable evaluation;
  when the design is too small for the full quadratic (1 + d + d(d+1)/2 coefficients) the cross
  terms are left out (a diagonal quadratic, 1 + 2d coefficients);
* the front on the surrogates is the non-dominated set of ``surrogate_samples`` uniform points
  plus as many drawn around that first front (σ = ``REFINE_SIGMA``) — a surrogate evaluation is a
  few flops, so dense sampling replaces the paper's NSGA-III; when it holds more than
  ``front_size`` points, a spread subset is taken by farthest-point selection in normalised
  objective space, starting from the best point of the first objective;
* after the front is evaluated the surrogates are fitted again on everything evaluated and a new
  front proposed, until the budget ends (the paper's MAP is the first round; later rounds refine
  it, in the spirit of its Bayesian variant). With one objective the front is the surrogate's
  maximiser. A proposal that was already evaluated is replaced by a fresh uniform point, so every
  round adds information. Discrete genes are handed out as their bins' centres.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, field_validator

from evomerge.records import Candidate, Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies.base import Strategy, StrategyOptions
from evomerge.strategies.pareto import non_dominated, objective_values

RIDGE = 1e-6
REFINE_SIGMA = 0.02


class MAPOptions(StrategyOptions):
    objectives: list[str] = Field(
        default=["fitness"],
        min_length=1,
        description='maximised objectives: "fitness" or keys of the evaluation\'s metrics (one per task)',
    )
    design_size: int | None = Field(default=None, ge=2, description="initial design (x0 first); default 2 × surrogate coefficients, ≥ 10")
    front_size: int = Field(default=8, ge=1, description="points of the surrogates' Pareto front evaluated per round")
    surrogate_samples: int = Field(default=4096, ge=16, description="uniform points the surrogates are evaluated on per round")

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, objectives: list[str]) -> list[str]:
        if len(set(objectives)) != len(objectives):
            raise ValueError("objectives must be distinct")
        return objectives


def quadratic_features(x: np.ndarray, full: bool) -> np.ndarray:
    """Rows ``[1, x_i, x_i x_j (i ≤ j)]`` (full) or ``[1, x_i, x_i²]`` (diagonal) for points ``x`` [n, d]."""
    x = np.atleast_2d(x)
    if full:
        i, j = np.triu_indices(x.shape[1])
        second = x[:, i] * x[:, j]
    else:
        second = x * x
    return np.hstack([np.ones((x.shape[0], 1)), x, second])


def n_coefficients(dim: int, full: bool) -> int:
    return 1 + dim + (dim * (dim + 1) // 2 if full else dim)


def fit_quadratic(x: np.ndarray, y: np.ndarray, full: bool) -> np.ndarray:
    """Least-squares coefficients (with a small ridge) of each column of ``y`` [n, k]: [p, k]."""
    features = quadratic_features(x, full)
    gram = features.T @ features + RIDGE * np.eye(features.shape[1])
    return np.linalg.solve(gram, features.T @ y)


def latin_hypercube(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """``n`` points in [0, 1]^dim with exactly one in each of the n strata of every coordinate."""
    strata = np.argsort(rng.random((dim, n)), axis=1).T
    return (strata + rng.random((n, dim))) / n


def spread_subset(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` rows chosen farthest-first in normalised objective space (best of column 0 first)."""
    if len(values) <= k:
        return np.arange(len(values))
    span = values.max(0) - values.min(0)
    scaled = (values - values.min(0)) / np.where(span > 0, span, 1.0)
    chosen = [int(np.argmax(values[:, 0]))]
    distance = np.linalg.norm(scaled - scaled[chosen[0]], axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(scaled - scaled[nxt], axis=1))
    return np.array(chosen)


class MAP(Strategy):
    Options = MAPOptions

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: MAPOptions) -> None:
        super().__init__(population, spec, seed, options)
        if not spec.bounded:
            raise ValueError("MAP fits surrogates over the unit cube; this space is unbounded")
        if spec.dim < 1:
            raise ValueError("MAP needs at least one searched gene")
        self._rng = np.random.default_rng(seed)
        size = options.design_size or max(10, 2 * n_coefficients(spec.dim, full=True))
        design = [np.clip(self.x0, 0.0, 1.0), *latin_hypercube(self._rng, size - 1, spec.dim)]
        self._queue: list[np.ndarray] = [spec.snap(x) for x in design]
        self._x: list[np.ndarray] = []  # usable evaluations: genomes …
        self._y: list[list[float]] = []  # … and their objective values
        self._seen: set[bytes] = set()  # every genome asked, usable or not

    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        if not self._queue and not self._outstanding:
            self._queue = self._propose()
        out = []
        while self._queue and len(out) < n:
            genome = self._queue.pop(0)
            self._seen.add(genome.tobytes())
            out.append((genome, (), None))
        return out

    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        values = objective_values(self.options.objectives, fitness, evaluation.metrics)  # type: ignore[attr-defined]
        if values is not None:
            self._x.append(candidate.genome.copy())
            self._y.append(values)

    def surrogate(self) -> tuple[np.ndarray, bool] | None:
        """``(coefficients [p, k], full)`` fitted on every usable evaluation, or None with too few."""
        if len(self._x) < 2:
            return None
        full = len(self._x) >= n_coefficients(self.dim, full=True)
        return fit_quadratic(np.array(self._x), np.array(self._y), full), full

    def _propose(self) -> list[np.ndarray]:
        """The next round: the surrogates' Pareto front, thinned to ``front_size``, as new genomes."""
        opts: MAPOptions = self.options  # type: ignore[assignment]
        fitted = self.surrogate()
        samples = self._rng.random((opts.surrogate_samples, self.dim))
        if fitted is None:  # nothing usable yet: keep exploring
            return [self.spec.snap(x) for x in samples[: opts.front_size]]
        coefficients, full = fitted
        points = np.vstack([samples, np.array(self._x)])
        front = non_dominated(quadratic_features(points, full) @ coefficients)
        around = points[front][self._rng.integers(0, len(front), opts.surrogate_samples)]
        around = np.clip(around + self._rng.normal(0.0, REFINE_SIGMA, around.shape), 0.0, 1.0)
        points = np.vstack([points[front], around])
        predicted = quadratic_features(points, full) @ coefficients
        front = non_dominated(predicted)
        chosen = front[spread_subset(predicted[front], opts.front_size)]
        out = []
        for x in points[chosen]:
            genome = self.spec.snap(np.clip(x, 0.0, 1.0))
            if genome.tobytes() in self._seen or any(np.array_equal(genome, o) for o in out):
                genome = self.spec.snap(self._rng.random(self.dim))  # known already: explore instead
            out.append(genome)
        return out

    def _state(self) -> Any:
        return {
            "rng": self._rng.bit_generator.state,
            "queue": [x.copy() for x in self._queue],
            "x": [x.copy() for x in self._x],
            "y": [list(v) for v in self._y],
            "seen": sorted(key.hex() for key in self._seen),
        }

    def _load_state(self, state: Any) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._queue = [np.array(x) for x in state["queue"]]
        self._x = [np.array(x) for x in state["x"]]
        self._y = [list(v) for v in state["y"]]
        self._seen = {bytes.fromhex(key) for key in state["seen"]}
