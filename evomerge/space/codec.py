"""Codecs: what a population's genome means, as the one object a worker decodes it through.

A run plan builds one codec per population (:meth:`evomerge.plan.RunPlan.codecs`); a worker
calls ``codec.decode(genome)`` and hands the result to its materializer. The worker never asks
which population or which method a genome belongs to: the codec already knows. Codecs are plain
data (a space, a grid and shapes), so they pickle and travel like any configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from evomerge.space.merge_space import Recipe, Space
from evomerge.space.paths import Path, PathSpace
from evomerge.space.seed_recipes import PiecewiseRecipe, SeedRecipe, split_grid_edges


class Codec(Protocol):
    def decode(self, genome: np.ndarray) -> Recipe | PiecewiseRecipe | Path:
        """What a worker applies for this genome."""


@dataclass(frozen=True)
class MergeCodec:
    """Unit-cube genomes of a merge space: a recipe of the space's merge method."""

    space: Space

    def decode(self, genome: np.ndarray) -> Recipe:
        return self.space.decode(genome)


@dataclass
class SeedRecipeCodec:
    """M2N2's seed recipes: pieces on a split grid over parameters of these shapes (model order)."""

    grid: str
    shapes: Sequence[tuple[int, ...]]
    labels: Sequence[str]
    _edges: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def block_edges(self) -> np.ndarray:
        """Element offsets of the grid's blocks, computed on first use (a rows grid of a large
        model has millions), never before the codec is sent anywhere."""
        if self._edges is None:
            self._edges = split_grid_edges(self.shapes, self.grid)
        return self._edges

    def decode(self, genome: np.ndarray) -> PiecewiseRecipe:
        recipe = SeedRecipe.decode(genome)
        return PiecewiseRecipe(self.block_edges()[recipe.edges], recipe.coeffs, tuple(self.labels))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_edges": None}


@dataclass(frozen=True)
class PathCodec:
    """Unit-cube genomes of the data-flow space: a path through the sources' frozen layers."""

    space: PathSpace

    def decode(self, genome: np.ndarray) -> Path:
        return self.space.decode(genome)
