"""The data-flow space: a genome chooses which frozen layers a token passes through, and how the
hidden state entering each is scaled (Akiba et al., "Evolutionary Optimization of Model Merging
Recipes", arXiv:2403.13187, §3.2).

The layers of the sources are laid out in order (every layer of source 0, then of source 1, …)
and the sequence is repeated ``repeats`` times: T slots. A slot's indicator gene says whether the
path passes through it (the paper's 2^T space: a gene of two levels, cut at 0.5); the path is the
slots switched on, in slot order. A slot's scale gene multiplies the hidden state entering its
layer (granularity ``per_slot``); or, as the paper's W (``matrix``), one scale per transition
(from layer i to layer j of the M laid-out layers, and from the embeddings to layer j: an
(M + 1) × M matrix), so a transition taken twice is scaled the same both times; or no scale is
searched (``none``, the paper's ablation that costs it more than 20 %). Scales are searched on a log scale, so the unit cube's centre of the
default bounds [1/2, 2] is exactly 1 and halving weighs as much as doubling.

The path runs in the embeddings, final norm and head of one source, the head source (the first
unless ``merge.dataflow.head_source`` names another). The initial genome switches on the first
repetition of the head source's layers only, so it decodes to that source's own path at scale 1:
the search starts from a model it reproduces exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from evomerge.space.genes import GeneRange, SearchSpec

SCALINGS = ("per_slot", "matrix", "none")
INDICATOR = "indicator"
LOG_SCALE = "log_scale"


class PathError(ValueError):
    """A genome decodes to a path the worker cannot run (empty, or longer than allowed): the
    candidate fails with this reason and the run goes on."""


@dataclass(frozen=True)
class Path:
    """A decoded genome: the layers a token passes through, in order, as (source, layer) pairs,
    and the scale applied to the hidden state entering each, in the head source's embeddings and
    head."""

    layers: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]
    source_labels: tuple[str, ...] = ()
    head: int = 0

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        label = (lambda s: self.source_labels[s]) if self.source_labels else str
        return {
            "space": "dataflow",
            "head": label(self.head),
            "path": [{"source": label(s), "layer": layer, "scale": scale} for (s, layer), scale in zip(self.layers, self.scales)],
        }


@dataclass(frozen=True)
class PathSpace:
    """Maps unit-cube genomes to :class:`Path` objects over sources of these layer counts."""

    layer_counts: tuple[int, ...]
    repeats: int = 3
    scaling: str = "per_slot"
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    max_layers: int | None = None
    source_labels: tuple[str, ...] = ()
    head: int = 0

    def __post_init__(self) -> None:
        if not self.layer_counts or min(self.layer_counts) < 1:
            raise ValueError("a data-flow space needs at least one source with layers")
        if not 0 <= self.head < len(self.layer_counts):
            raise ValueError(f"head source {self.head} is not one of the {len(self.layer_counts)} sources")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got '{self.scaling}'")
        low, high = self.scale_bounds
        if not 0 < low < high:
            raise ValueError(f"scale bounds must satisfy 0 < low < high, got [{low}, {high}]")
        if not low <= 1.0 <= high:
            raise ValueError(f"scale bounds [{low}, {high}] must contain 1, the initial path's scale")
        if self.max_layers is not None and self.max_layers < self.layer_counts[self.head]:
            raise ValueError(
                f"max_layers {self.max_layers} is shorter than the initial path (the head source's"
                f" {self.layer_counts[self.head]} layers)"
            )

    # --- layout ----------------------------------------------------------------------------------
    @property
    def slots(self) -> tuple[tuple[int, int], ...]:
        """(source, layer) of every slot, in slot order: T = repeats × total layers."""
        one = tuple((s, layer) for s, n in enumerate(self.layer_counts) for layer in range(n))
        return one * self.repeats

    @property
    def layer_total(self) -> int:
        """M: the sources' layers laid out once."""
        return sum(self.layer_counts)

    def layer_id(self, source: int, layer: int) -> int:
        """A source layer's index among the M laid-out layers (a row/column of the matrix W)."""
        return sum(self.layer_counts[:source]) + layer

    @property
    def genes(self) -> tuple[GeneRange, ...]:
        t = len(self.slots)
        genes = [GeneRange(INDICATOR, 0, t, 0.0, 1.0, levels=2)]
        scales = {"per_slot": t, "matrix": (self.layer_total + 1) * self.layer_total, "none": 0}[self.scaling]
        if scales:
            low, high = self.scale_bounds
            genes.append(GeneRange(LOG_SCALE, t, t + scales, math.log(low), math.log(high)))
        return tuple(genes)

    def transition(self, previous: tuple[int, int] | None, layer: tuple[int, int]) -> int:
        """The entry of W (row-major, row 0 the embeddings) scaling ``layer``'s input after ``previous``."""
        row = 0 if previous is None else self.layer_id(*previous) + 1
        return row * self.layer_total + self.layer_id(*layer)

    @property
    def dim(self) -> int:
        return sum(g.size for g in self.genes)

    # --- genomes ---------------------------------------------------------------------------------
    def encode(self, layers: Sequence[tuple[int, int]] | None = None, scales: Sequence[float] | None = None) -> np.ndarray:
        """The genome of a path given as slots switched on in order (default: the head source's own path)
        and their scales (default 1). A path must visit the slots in slot order: ``layers`` are
        matched greedily to the first free slot after the previous one."""
        layers = [(self.head, layer) for layer in range(self.layer_counts[self.head])] if layers is None else list(layers)
        scales = [1.0] * len(layers) if scales is None else list(scales)
        if len(scales) != len(layers):
            raise ValueError(f"{len(layers)} layers but {len(scales)} scales")
        slots, on, slot_scale = self.slots, np.zeros(len(self.slots)), np.ones(len(self.slots))
        matrix: dict[int, float] = {}
        pos, previous = 0, None
        for want, scale in zip(layers, scales):
            while pos < len(slots) and slots[pos] != tuple(want):
                pos += 1
            if pos == len(slots):
                raise ValueError(f"the path cannot be laid out in {self.repeats} repeats of the sources' layers at {want}")
            on[pos], slot_scale[pos] = 1, scale
            entry = self.transition(previous, slots[pos])
            if matrix.setdefault(entry, scale) != scale:
                raise ValueError(f"the transition into {slots[pos]} is taken twice with different scales; scaling 'matrix' has one per transition")
            pos, previous = pos + 1, slots[pos]
        indicator = self.genes[0]
        parts = [indicator.centre(on.astype(np.int64))]
        if self.scaling == "per_slot":
            parts.append(self.genes[1].to_unit(np.log(slot_scale)))
        elif self.scaling == "matrix":
            w = np.ones(self.genes[1].size)
            w[list(matrix)] = list(matrix.values())
            parts.append(self.genes[1].to_unit(np.log(w)))
        return np.concatenate(parts)

    def x0(self) -> np.ndarray:
        return self.encode()

    def search_spec(self) -> SearchSpec:
        """The strategies' view: the unit cube, starting at the head source's own path."""
        return SearchSpec(self.dim, self.x0(), self.genes)

    def decode(self, genome: np.ndarray) -> Path:
        genome = np.asarray(genome, dtype=np.float64)
        if genome.shape != (self.dim,):
            raise ValueError(f"genome has shape {genome.shape}, the data-flow space expects ({self.dim},)")
        unit = np.clip(genome, 0.0, 1.0)
        on = self.genes[0].level(unit).astype(bool)
        chosen = np.flatnonzero(on)
        if chosen.size == 0:
            raise PathError("the genome switches every slot off: the path is empty")
        if self.max_layers is not None and chosen.size > self.max_layers:
            raise PathError(f"the path has {chosen.size} layers, more than merge.dataflow.max_layers ({self.max_layers})")
        layers = tuple(self.slots[i] for i in chosen)
        if self.scaling == "none":
            return Path(layers, (1.0,) * len(layers), tuple(self.source_labels), self.head)
        scale_gene = self.genes[1]
        scales = np.exp(scale_gene.to_real(unit[scale_gene.start : scale_gene.stop]))
        if self.scaling == "per_slot":
            picked = [scales[i] for i in chosen]
        else:
            picked = [scales[self.transition(prev, layer)] for prev, layer in zip((None, *layers[:-1]), layers)]
        return Path(layers, tuple(float(x) for x in picked), tuple(self.source_labels), self.head)

    def source_alone(self, source: int) -> Path:
        """The path through every layer of one source, in order, at scale 1."""
        n = self.layer_counts[source]
        return Path(tuple((source, layer) for layer in range(n)), (1.0,) * n, tuple(self.source_labels), self.head)

    def summary(self) -> dict:
        """What the run store records of the space a population searches."""
        return {"space": "dataflow", "slots": len(self.slots), "scaling": self.scaling, "dim": self.dim}
