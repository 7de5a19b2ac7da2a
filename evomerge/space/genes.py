"""Genes: where a parameter sits in a genome, its bounds, and its discrete levels.

Strategies see genomes in the unit cube (nevergrad's parametrization idea); a :class:`GeneRange`
says which slice of the genome one parameter occupies and how unit coordinates map to real
values. The unit ↔ level bin arithmetic of discrete genes is written here once: the merge space
decodes with it, continuous strategies snap to bin centres with it, and the Optuna samplers ask
for levels natively through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from evomerge.space.seed_recipes import SeedGram, SeedRecipe


@dataclass(frozen=True)
class GeneRange:
    """Parameter ``name`` occupies ``genome[start:stop]``; unit-cube 0 and 1 mean ``low`` and ``high``.

    ``groups`` is the number of tensor groups the slice is split into (a merge space's
    granularity), each holding ``size // groups`` values (one per expert, or one shared).
    Strategies that treat genes differently (Evo-Merging searches α, then β; its penalty is on
    real values) find them by name instead of guessing positions.
    """

    name: str
    start: int
    stop: int
    low: float
    high: float
    levels: int | None = None
    """Discrete genes (layer swapping's expert choice, consensus' k) take ``levels`` values: the
    unit interval is cut into that many equal bins and a gene means the bin it falls in, so each
    level is equally likely under uniform sampling. Continuous strategies (CMA-ES, M2N2, random
    search) search the relaxed gene and hand out bin centres (:meth:`SearchSpec.snap`); the Optuna
    samplers ask for the level natively."""
    groups: int = 1

    @property
    def size(self) -> int:
        return self.stop - self.start

    # --- the bin arithmetic, on unit coordinates ------------------------------------------------
    def bin(self, unit: np.ndarray) -> np.ndarray:
        """The level (bin index) of unit coordinates; discrete genes only."""
        if self.levels is None:
            raise ValueError(f"gene '{self.name}' is continuous: it has no levels")
        return np.minimum(np.floor(np.clip(unit, 0.0, 1.0) * self.levels).astype(np.int64), self.levels - 1)

    def centre(self, level: np.ndarray | int) -> np.ndarray:
        """Unit coordinate of the middle of bin ``level``."""
        if self.levels is None:
            raise ValueError(f"gene '{self.name}' is continuous: it has no levels")
        return (np.asarray(level, dtype=np.float64) + 0.5) / self.levels

    def to_unit(self, value: np.ndarray | float) -> np.ndarray:
        """Unit coordinates of real values (the centre of its bin for an integer value)."""
        value = np.asarray(value, dtype=np.float64)
        if self.levels is None:
            return (value - self.low) / (self.high - self.low)
        return self.centre(np.clip(np.rint(value - self.low), 0, self.levels - 1))

    def to_real(self, unit: np.ndarray) -> np.ndarray:
        """Real values of unit coordinates (integers for a discrete gene)."""
        if self.levels is None:
            return self.low + unit * (self.high - self.low)
        return self.low + self.bin(unit)

    # --- the same, read from a whole genome ----------------------------------------------------
    def real(self, genome: np.ndarray) -> np.ndarray:
        """This gene's values in a genome as real numbers, relaxed (no binning): penalties and plots."""
        return self.low + np.clip(genome[self.start : self.stop], 0.0, 1.0) * (self.high - self.low)

    def level(self, genome: np.ndarray) -> np.ndarray:
        """The level of each of this gene's values in a genome (discrete genes only)."""
        return self.bin(genome[self.start : self.stop])


@dataclass(frozen=True)
class SearchSpec:
    """What a strategy knows of its search space.

    ``bounded`` genomes live in the unit cube (recipe space, decoded by
    :class:`evomerge.space.merge_space.Space`); unbounded ones are raw parameter vectors (M2N2's
    weight space). ``seeds`` are genomes an archive-based strategy evaluates before it breeds
    (M2N2's seed models); ``x0`` is the starting point of model-based ones (CMA-ES's mean).
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

        Genomes are encoded :class:`~evomerge.space.seed_recipes.SeedRecipe` vectors of varying
        length; ``dim`` is the number of model parameters they describe.
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
