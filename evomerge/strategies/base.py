"""The ask/tell contract every population's optimizer follows.

As in evosax and pycma: a strategy proposes candidates (``ask``), hears back their evaluations in
any order (``tell``), and can be checkpointed and restored exactly (``state_dict`` /
``load_state_dict``). The base class does the shared bookkeeping — candidate ids, the best so
far, failed or NaN results counting as the worst — so a subclass writes only ``_ask``/``_tell``
and its own state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from evomerge.records import Candidate, Evaluation
from evomerge.space.genes import SearchSpec


class StrategyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


MERGE_SPACE = "merge"
"""Genomes in the unit cube of the run's merge space, decoded to a recipe of its merge method."""
SEED_RECIPES = "seed_recipes"
"""Genomes that are M2N2 seed recipes: piecewise combinations of the experts on a split grid."""


@dataclass(frozen=True)
class Requirements:
    """What a population's strategy needs of its run, declared as data so the run plan can check it
    (and build the right space) before any model loads.

    ``space``: :data:`MERGE_SPACE` or :data:`SEED_RECIPES` (then ``split_grid`` says where split
    points may fall; seed recipes need the experts' weights). ``genes``: merge parameters that must
    be searched (Evo-Merging's ``alpha`` and ``beta``). ``gradient``: each evaluation must carry
    the gradient of the merged model's prediction entropy (``metrics["loss_gradient"]``), which a
    white-box worker computes for a differentiable merge method.
    """

    space: str = MERGE_SPACE
    split_grid: str | None = None
    genes: tuple[str, ...] = ()
    gradient: bool = False


class Strategy(ABC):
    """One population. Subclasses set ``Options`` and implement ``_ask``/``_tell``/state hooks."""

    Options: type[StrategyOptions] = StrategyOptions

    @classmethod
    def requires(cls, options: StrategyOptions) -> Requirements:
        """What this strategy, with these options, needs of its run (nothing special by default)."""
        return Requirements()

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: StrategyOptions) -> None:
        self.population = population
        self.spec = spec
        self.dim = spec.dim
        self.x0 = np.asarray(spec.x0, dtype=np.float64)
        self.seed = seed
        self.options = options
        self._next_number = 0
        self._outstanding: dict[str, Candidate] = {}
        self._tags: dict[str, Any] = {}
        self._best: tuple[str, np.ndarray, float] | None = None
        self.n_told = 0

    # --- the public contract -------------------------------------------------------------
    def ask(self, n: int = 1) -> list[Candidate]:
        """Up to ``n`` new candidates; fewer (even none) while e.g. a generation is incomplete."""
        out = []
        for genome, parents, tag in self._ask(n):
            cand = Candidate(
                id=f"{self.population}:{self._next_number}",
                population=self.population,
                genome=np.asarray(genome, dtype=np.float64),
                parent_ids=tuple(parents),
            )
            self._next_number += 1
            self._outstanding[cand.id] = cand
            self._tags[cand.id] = tag
            out.append(cand)
        return out

    def tell(self, evaluations: list[Evaluation]) -> None:
        """Accept results in any order; unknown ids are an error (they belong elsewhere)."""
        for ev in evaluations:
            cand = self._outstanding.pop(ev.candidate_id, None)
            if cand is None:
                raise KeyError(f"{self.population}: no outstanding candidate '{ev.candidate_id}'")
            tag = self._tags.pop(ev.candidate_id)
            fitness = ev.fitness if ev.usable else -math.inf
            if math.isfinite(fitness) and (self._best is None or fitness > self._best[2]):
                self._best = (cand.id, cand.genome.copy(), fitness)
            self.n_told += 1
            self._tell(cand, tag, fitness, ev)

    def best(self) -> tuple[str, np.ndarray, float] | None:
        """``(candidate_id, genome, fitness)`` of the best usable evaluation so far."""
        return self._best

    def stop(self) -> dict[str, Any]:
        """Reasons this population has nothing more to propose (empty while it goes on)."""
        return {}

    def racing_rank(self, top_k: int) -> int:
        """Racing (``fitness.racing``): the rank among this population's fully scored members of
        the one a candidate must still be able to beat to matter here. ``top_k`` by default: a
        strategy that learns from the best (CMA-ES ranks, the best so far) loses little when a
        candidate that cannot beat them is stopped early with an estimate."""
        return top_k

    def immigrate(self, genome: np.ndarray, evaluation: Evaluation) -> None:
        """Take in a good member of another population (migration between populations).

        The genome lives in this population's space and was scored as ``evaluation``. Strategies
        with an archive or a model of the search use it (M2N2 and GA insert it into the archive,
        CMA-ES injects it into its next generation, Optuna adds it as a finished trial); the others
        (random search, Evo-Merging's staged CMA-ES) keep to their own course and ignore it.
        """

    def outstanding(self) -> list[Candidate]:
        """Candidates asked but not told: after a restore, the ones a resumed run scores again."""
        return list(self._outstanding.values())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as plain data (JSON values and numpy arrays):
        see :mod:`evomerge.plaindata`."""
        return {
            "next_number": self._next_number,
            "outstanding": [[c.id, c.genome, list(c.parent_ids), self._tags[c.id]] for c in self._outstanding.values()],
            "best": None if self._best is None else list(self._best),
            "n_told": self.n_told,
            "strategy": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next_number = state["next_number"]
        self._outstanding = {
            cid: Candidate(id=cid, population=self.population, genome=np.asarray(g), parent_ids=tuple(p))
            for cid, g, p, _ in state["outstanding"]
        }
        self._tags = {cid: tag for cid, _, _, tag in state["outstanding"]}
        best = state["best"]
        self._best = None if best is None else (best[0], np.asarray(best[1], dtype=np.float64), float(best[2]))
        self.n_told = state["n_told"]
        self._load_state(state["strategy"])

    # --- subclass hooks --------------------------------------------------------------------
    @abstractmethod
    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        """Up to ``n`` (genome, parent ids, tag); the tag comes back with the candidate's result."""

    @abstractmethod
    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        """``fitness`` is -inf for failed or NaN evaluations. With racing, an evaluation stopped
        early (``evaluation.fidelity < 1``) carries an estimate from the examples it was scored on,
        which is below its population's k-th best: right for ranking it low; a strategy that keeps
        per-example scores (an archive) must not take it as a full row."""

    @abstractmethod
    def _state(self) -> Any:
        """Everything that evolves, as plain data (JSON values and numpy arrays, no library objects)."""

    @abstractmethod
    def _load_state(self, state: Any) -> None: ...
