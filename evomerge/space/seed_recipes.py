"""M2N2 without an archive of weights: members as piecewise-constant combinations of the seeds.

Without mutation every M2N2 child is a linear combination of the seed models whose coefficients
are constant on pieces of the flattened parameter vector: the seeds are such combinations (one
piece, a unit coefficient), and the split-point SLERP of two of them is one again — on each side
of the split the child is ``s0·A + s1·B`` with the SLERP coefficients of the mix ratio there,
which only need the inner products ⟨A, B⟩, ⟨A, A⟩, ⟨B, B⟩. Those follow from the seeds' Gram
matrices over each piece, so keeping per-block Gram prefix sums of the seeds (computed once) lets
a controller breed members of a 7-billion-parameter archive from a few numbers each, while the
workers hold only the seeds and materialize a member like a linear merge.

Split points lie on a block grid: every element for small models (then the recipe form gives the
weight-space children exactly), tensor rows for large ones. A worker applies a member as a
:class:`PiecewiseRecipe`: the same pieces in element offsets of the flattened parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from evomerge.space.interpolation import split_slerp_coefficients

SPLIT_GRIDS = ("rows", "elements")
"""Where M2N2's seed-recipe split points may fall: between tensor rows (first dimension), or
anywhere (exact, for small models: one Gram matrix per parameter)."""
ELEMENT_GRID_LIMIT = 50_000_000
"""Parameters above which an element grid is refused: it keeps one Gram matrix per parameter."""


def split_grid_edges(shapes: Sequence[Sequence[int]], grid: str) -> np.ndarray:
    """Element offsets of the blocks of a split grid over parameters of these shapes (model order).

    ``rows``: each matrix row is a block, a vector or scalar one block; ``elements``: every element.
    Shapes suffice, so a report can place a seed recipe's pieces without loading weights.
    """
    if grid not in SPLIT_GRIDS:
        raise ValueError(f"split grid must be one of {', '.join(SPLIT_GRIDS)}, got '{grid}'")
    sizes = [int(np.prod(shape)) for shape in shapes]
    if grid == "elements":
        return np.arange(sum(sizes) + 1, dtype=np.int64)
    edges, offset = [np.zeros(1, dtype=np.int64)], 0
    for shape, numel in zip(shapes, sizes):
        rows = shape[0] if len(shape) > 1 else 1
        edges.append(offset + np.arange(1, rows + 1, dtype=np.int64) * (numel // rows))
        offset += numel
    return np.concatenate(edges)


def check_split_grid(grid: str, n_parameters: int) -> None:
    """Refuse an element grid on a model too large for one Gram matrix per parameter."""
    if grid == "elements" and n_parameters > ELEMENT_GRID_LIMIT:
        raise ValueError(
            f"a split grid of single elements keeps one Gram matrix per parameter; this model has"
            f" {n_parameters:,} parameters — use the 'rows' grid"
        )


@dataclass(frozen=True)
class SeedRecipe:
    """``coeffs[k] · seeds`` on piece ``k``, the blocks ``edges[k] .. edges[k+1]`` (block units)."""

    edges: np.ndarray
    coeffs: np.ndarray

    @classmethod
    def seed(cls, index: int, n_seeds: int, n_blocks: int) -> "SeedRecipe":
        coeffs = np.zeros((1, n_seeds))
        coeffs[0, index] = 1.0
        return cls(np.array([0, n_blocks], dtype=np.int64), coeffs)

    @property
    def n_seeds(self) -> int:
        return self.coeffs.shape[1]

    def encode(self) -> np.ndarray:
        """A flat float vector (the candidate's genome): ``[pieces, seeds, edges…, coeffs…]``."""
        k, s = self.coeffs.shape
        return np.concatenate([[k, s], self.edges.astype(np.float64), self.coeffs.reshape(-1)])

    @classmethod
    def decode(cls, genome: np.ndarray) -> "SeedRecipe":
        genome = np.asarray(genome, dtype=np.float64)
        if genome.size < 2:
            raise ValueError("not a seed recipe: too short")
        k, s = int(genome[0]), int(genome[1])
        if k < 1 or s < 1 or genome.size != 2 + (k + 1) + k * s:
            raise ValueError(f"not a seed recipe: {genome.size} numbers do not fit {k} pieces over {s} seeds")
        edges = genome[2 : 3 + k].astype(np.int64)
        if edges[0] != 0 or np.any(np.diff(edges) <= 0):
            raise ValueError("not a seed recipe: piece edges must start at 0 and increase")
        return cls(edges, genome[3 + k :].reshape(k, s).copy())

    def coefficients_at(self, positions: np.ndarray) -> np.ndarray:
        """The coefficient row of the piece holding each block position."""
        return self.coeffs[np.searchsorted(self.edges, positions, side="right") - 1]

    def compact(self) -> "SeedRecipe":
        """Merge neighbouring pieces with equal coefficients, so pieces grow only where they differ."""
        keep = np.ones(len(self.coeffs), dtype=bool)
        keep[1:] = np.any(self.coeffs[1:] != self.coeffs[:-1], axis=1)
        starts = self.edges[:-1][keep]
        return SeedRecipe(np.append(starts, self.edges[-1]), self.coeffs[keep])


@dataclass(frozen=True)
class SeedGram:
    """Prefix sums of the seeds' Gram matrices over a block grid of the flat parameter vector.

    ``block_edges`` are element offsets (``B + 1`` of them); ``prefix[b]`` is the Gram matrix of
    the seeds restricted to elements ``[0, block_edges[b])``.
    """

    block_edges: np.ndarray
    prefix: np.ndarray

    @property
    def n_blocks(self) -> int:
        return len(self.block_edges) - 1

    @property
    def n_seeds(self) -> int:
        return self.prefix.shape[1]

    @classmethod
    def from_block_grams(cls, block_edges: np.ndarray, block_grams: np.ndarray) -> "SeedGram":
        """From one ``S × S`` Gram matrix per block (workers compute those on their device)."""
        edges = np.asarray(block_edges, dtype=np.int64)
        grams = np.asarray(block_grams, dtype=np.float64)
        if grams.ndim != 3 or grams.shape[0] != len(edges) - 1 or grams.shape[1] != grams.shape[2]:
            raise ValueError(f"expected one square Gram matrix per block ({len(edges) - 1}), got shape {grams.shape}")
        prefix = np.zeros((len(edges), grams.shape[1], grams.shape[2]))
        np.cumsum(grams, axis=0, out=prefix[1:])
        return cls(edges, prefix)

    @classmethod
    def from_flat(cls, seeds: np.ndarray, block_edges: np.ndarray | None = None) -> "SeedGram":
        """From flattened seeds ``(S, D)``; one block per element unless ``block_edges`` says otherwise."""
        seeds = np.asarray(seeds, dtype=np.float64)
        edges = np.arange(seeds.shape[1] + 1) if block_edges is None else np.asarray(block_edges, dtype=np.int64)
        if edges[0] != 0 or edges[-1] != seeds.shape[1]:
            raise ValueError("block edges must run from 0 to the number of parameters")
        grams = np.add.reduceat(np.einsum("sd,td->dst", seeds, seeds), edges[:-1], axis=0)
        return cls.from_block_grams(edges, grams)

    def inner(self, a: SeedRecipe, b: SeedRecipe) -> float:
        """⟨a, b⟩ of the two materialized parameter vectors, from the Gram prefix sums alone."""
        edges = np.union1d(a.edges, b.edges)
        grams = self.prefix[edges[1:]] - self.prefix[edges[:-1]]
        left = a.coefficients_at(edges[:-1])
        right = b.coefficients_at(edges[:-1])
        return float(np.einsum("ks,kst,kt->", left, grams, right))

    def crossover(self, a: SeedRecipe, b: SeedRecipe, split_block: int, mix: float) -> SeedRecipe:
        """M2N2's split-point SLERP of two members, as a recipe: mix ``mix`` before the split, ``1 − mix`` after."""
        aa, bb = self.inner(a, a), self.inner(b, b)
        cos_omega = self.inner(a, b) / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
        before = split_slerp_coefficients(mix, cos_omega)
        after = split_slerp_coefficients(1.0 - mix, cos_omega)
        edges = np.union1d(np.union1d(a.edges, b.edges), [min(max(split_block, 0), self.n_blocks)])
        starts = edges[:-1]
        left, right = a.coefficients_at(starts), b.coefficients_at(starts)
        ca = np.where(starts < split_block, before[0], after[0])[:, None]
        cb = np.where(starts < split_block, before[1], after[1])[:, None]
        return SeedRecipe(edges, ca * left + cb * right).compact()

    def materialize(self, recipe: SeedRecipe, seeds: np.ndarray) -> np.ndarray:
        """The flat parameter vector of a recipe (small models and tests; workers do this in torch)."""
        out = np.empty(seeds.shape[1], dtype=np.result_type(seeds.dtype, np.float64))
        for k in range(len(recipe.coeffs)):
            lo, hi = self.block_edges[recipe.edges[k]], self.block_edges[recipe.edges[k + 1]]
            out[lo:hi] = recipe.coeffs[k] @ seeds[:, lo:hi]
        return out


@dataclass(frozen=True)
class PiecewiseRecipe:
    """``Σ_s coefficients[k, s] · expert_s`` on each piece ``[edges[k], edges[k+1])`` of the
    flattened parameters (element offsets): a decoded seed recipe, as a materializer applies it."""

    edges: np.ndarray
    coefficients: np.ndarray
    labels: Sequence[str] = field(default=())
    """The experts' names, for :meth:`to_dict` only."""

    def to_dict(self) -> dict:
        return {
            "method": "seed_recipe",
            "pieces": [
                {"start": int(lo), "end": int(hi), "weights": dict(zip(self.labels, map(float, row)))}
                for lo, hi, row in zip(self.edges[:-1], self.edges[1:], self.coefficients)
            ],
        }
