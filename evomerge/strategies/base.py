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
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from evomerge.records import Candidate, Evaluation
from evomerge.strategies.seed_recipes import SeedGram, SeedRecipe


class StrategyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class GeneRange:
    """Parameter ``name`` occupies ``genome[start:stop]``; unit-cube 0 and 1 mean ``low`` and ``high``.

    Strategies that treat genes differently (Evo-Merging searches α, then β; its penalty is on
    real values) find them here instead of guessing positions.
    """

    name: str
    start: int
    stop: int
    low: float
    high: float
    levels: int | None = None
    """Discrete genes (layer swapping's expert choice, consensus' k) take ``levels`` values: the
    unit interval is cut into that many equal bins and a gene means the bin it falls in. Continuous
    strategies (CMA-ES, M2N2, random search) search the relaxed gene and hand out bin centres
    (:meth:`SearchSpec.snap`); the Optuna samplers ask for the level natively."""

    def real(self, genome: np.ndarray) -> np.ndarray:
        return self.low + np.clip(genome[self.start : self.stop], 0.0, 1.0) * (self.high - self.low)

    def level(self, genome: np.ndarray) -> np.ndarray:
        """The bin index of each of this gene's values (discrete genes only)."""
        assert self.levels is not None
        unit = np.clip(genome[self.start : self.stop], 0.0, 1.0)
        return np.minimum((unit * self.levels).astype(np.int64), self.levels - 1)

    def centre(self, level: np.ndarray | int) -> np.ndarray:
        """Unit-cube coordinate of the middle of bin ``level``."""
        assert self.levels is not None
        return (np.asarray(level, dtype=np.float64) + 0.5) / self.levels


@dataclass(frozen=True)
class SearchSpec:
    """What a strategy knows of its search space.

    ``bounded`` genomes live in the unit cube (recipe space, decoded by :class:`evomerge.space.Space`);
    unbounded ones are raw parameter vectors (M2N2's weight space). ``seeds`` are genomes an
    archive-based strategy evaluates before it breeds (M2N2's seed models); ``x0`` is the
    starting point of model-based ones (CMA-ES's mean).
    """

    dim: int
    x0: np.ndarray
    genes: tuple[GeneRange, ...] = ()
    bounded: bool = True
    seeds: tuple[np.ndarray, ...] = field(default=())
    seed_gram: SeedGram | None = None

    @classmethod
    def unit_cube(cls, dim: int, x0: np.ndarray | None = None, seeds: Sequence[np.ndarray] = ()) -> "SearchSpec":
        """A plain ``[0, 1]^dim`` space with one gene range (tests, benchmarks, custom spaces)."""
        start = np.full(dim, 0.5) if x0 is None else np.asarray(x0, dtype=np.float64)
        return cls(dim, start, (GeneRange("x", 0, dim, 0.0, 1.0),), True, tuple(np.asarray(s, dtype=np.float64) for s in seeds))

    @classmethod
    def weights(cls, seeds: Sequence[np.ndarray]) -> "SearchSpec":
        """Raw parameter vectors, e.g. flattened models: the seeds are the models to evolve from."""
        flat = tuple(np.asarray(s).reshape(-1) for s in seeds)
        if not flat:
            raise ValueError("a weight space needs at least one seed model")
        dim = flat[0].size
        if any(s.size != dim for s in flat):
            raise ValueError("all seed models must have the same number of parameters")
        return cls(dim, flat[0], (GeneRange("weights", 0, dim, -math.inf, math.inf),), False, flat)

    @classmethod
    def seed_recipes(cls, gram: SeedGram) -> "SearchSpec":
        """Members as piecewise combinations of the seeds (M2N2 on models too large to archive).

        Genomes are encoded :class:`~evomerge.strategies.seed_recipes.SeedRecipe` vectors of
        varying length; ``dim`` is the number of model parameters they describe.
        """
        x0 = SeedRecipe.seed(0, gram.n_seeds, gram.n_blocks).encode()
        return cls(int(gram.block_edges[-1]), x0, (), False, (), gram)

    @property
    def discrete(self) -> tuple[GeneRange, ...]:
        return tuple(g for g in self.genes if g.levels is not None)

    def snap(self, genome: np.ndarray) -> np.ndarray:
        """``genome`` with every discrete gene moved to the centre of its bin.

        Two genomes that decode to the same recipe are then the same genome, so the run's cache
        scores them once and their recipes share one seed.
        """
        if not self.discrete:
            return genome
        out = np.array(genome, dtype=np.float64)
        for g in self.discrete:
            out[g.start : g.stop] = g.centre(g.level(out))
        return out

    def gene(self, name: str) -> GeneRange:
        for g in self.genes:
            if g.name == name:
                return g
        raise ValueError(f"the search space has no gene '{name}' (it has: {', '.join(g.name for g in self.genes) or 'none'})")


class Strategy(ABC):
    """One population. Subclasses set ``Options`` and implement ``_ask``/``_tell``/state hooks."""

    Options: type[StrategyOptions] = StrategyOptions

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
        """``fitness`` is -inf for failed or NaN evaluations."""

    @abstractmethod
    def _state(self) -> Any:
        """Everything that evolves, as plain data (JSON values and numpy arrays, no library objects)."""

    @abstractmethod
    def _load_state(self, state: Any) -> None: ...
