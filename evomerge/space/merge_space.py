"""The merge space: how a bounded genome vector becomes a merge recipe.

Strategies only ever see vectors in the unit cube [0, 1]^d; the space owns bounds, grouping and
decoding (nevergrad's parametrization idea). Genes are derived from the merge method's declared
parameters — never from a hand-kept table — at one of four granularities:

* ``global``: one value per parameter, shared by every expert and tensor;
* ``per_model``: one value per expert for per-model parameters (weights, densities), shared by
  every tensor;
* ``per_layer_group``: as ``per_model``, separately for each of k groups of consecutive layers
  (tensors outside the layers join the first group if they come before them, the last otherwise,
  as mergekit plans embeddings and heads);
* ``per_tensor``: separately for every tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from evomerge.merge.method import MergeMethod
from evomerge.records import genome_hash
from evomerge.space.genes import GeneRange, SearchSpec

GRANULARITIES = ("global", "per_model", "per_layer_group", "per_tensor")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(tensor_name: str) -> int | None:
    """The transformer-block index in a parameter name (``model.layers.7.mlp…`` → 7)."""
    match = _LAYER_INDEX.search(tensor_name)
    return int(match.group(1)) if match else None


def group_tensors(
    tensor_names: Sequence[str], granularity: str, layer_groups: int | None
) -> tuple[list[str], list[int]]:
    """Group names and, per tensor (in model order), the index of its group."""
    if granularity in ("global", "per_model"):
        return ["all"], [0] * len(tensor_names)
    if granularity == "per_tensor":
        return list(tensor_names), list(range(len(tensor_names)))
    layers = [layer_index(n) for n in tensor_names]
    found = sorted({i for i in layers if i is not None})
    if not found:
        raise ValueError("granularity per_layer_group: no numbered layers found in the model's tensor names")
    n_layers = found[-1] + 1
    k = n_layers if layer_groups is None else layer_groups
    if not 1 <= k <= n_layers:
        raise ValueError(f"layer_groups must be between 1 and the model's {n_layers} layers, got {k}")
    group_of_layer = [layer * k // n_layers for layer in range(n_layers)]
    first_layer_pos = next(i for i, layer in enumerate(layers) if layer is not None)
    groups: list[int] = []
    for pos, layer in enumerate(layers):
        if layer is not None:
            groups.append(group_of_layer[layer])
        else:
            groups.append(0 if pos < first_layer_pos else k - 1)
    names = []
    for g in range(k):
        members = [layer for layer in range(n_layers) if group_of_layer[layer] == g]
        names.append(f"layers {members[0]}-{members[-1]}" if len(members) > 1 else f"layer {members[0]}")
    return names, groups


@dataclass
class Recipe:
    """A decoded genome: concrete parameter values for every tensor group.

    ``values[param][g]`` is a list with one value per expert (per-model parameters) or a single
    value. ``seed`` drives random operators (DARE), so the same recipe always merges the same way.
    ``method`` is the resolved declaration, so whoever applies the recipe never looks a name up.
    """

    method: MergeMethod
    group_names: list[str]
    values: dict[str, list[list[float]]]
    options: dict[str, bool]
    seed: int
    tensor_groups: Mapping[str, int] = field(default_factory=dict, repr=False)

    def params_for(self, tensor_name: str) -> dict[str, list[float] | float]:
        """The values the kernel takes for one tensor: a list per expert, or one shared value.

        With a single group (granularity ``global`` or ``per_model``) every tensor takes it, so a
        recipe decoded without the model's tensor names (a black-box space) applies to any layout.
        """
        g = 0 if len(self.group_names) == 1 else self.tensor_groups[tensor_name]
        return {spec.name: (self.values[spec.name][g] if spec.per_model else self.values[spec.name][g][0]) for spec in self.method.params}

    def to_dict(self) -> dict:
        return {
            "method": self.method.name,
            "options": dict(self.options),
            "seed": self.seed,
            "groups": [
                {"name": name, **{p: (v[g] if len(v[g]) > 1 else v[g][0]) for p, v in self.values.items()}}
                for g, name in enumerate(self.group_names)
            ],
        }


def genome_seed(genome: np.ndarray) -> int:
    """A stable 63-bit seed from a genome's bytes: identical genomes merge identically."""
    digest = bytes.fromhex(genome_hash(genome))
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Space:
    """Maps unit-cube genomes to recipes of one merge method over one model layout."""

    method: MergeMethod
    n_models: int
    granularity: str
    group_names: list[str]
    tensor_groups: dict[str, int]
    genes: list[GeneRange]
    init: dict[str, float]
    """The starting value of each searched parameter (its declared default unless configured)."""
    fixed: dict[str, float]
    options: dict[str, bool]

    @classmethod
    def build(
        cls,
        method: MergeMethod,
        tensor_names: Sequence[str],
        n_models: int,
        granularity: str = "per_model",
        layer_groups: int | None = None,
        search: Sequence[str] | None = None,
        fixed: Mapping[str, float] | None = None,
        bounds: Mapping[str, tuple[float, float]] | None = None,
        init: Mapping[str, float] | None = None,
        options: Mapping[str, bool] | None = None,
    ) -> "Space":
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got '{granularity}'")
        if method.global_only and granularity != "global":
            raise ValueError(f"merge method '{method.name}' only supports granularity 'global'")
        fixed = dict(fixed or {})
        bounds = dict(bounds or {})
        init = dict(init or {})
        for name in [*fixed, *bounds, *init]:
            method.param(name)  # raises ValueError naming the known parameters
        searched = [p.name for p in method.params if p.name not in fixed] if search is None else list(search)
        for name in searched:
            method.param(name)
            if name in fixed:
                raise ValueError(f"parameter '{name}' is both searched and fixed")
        group_names, groups = group_tensors(tensor_names, granularity, layer_groups)
        genes: list[GeneRange] = []
        starts: dict[str, float] = {}
        offset = 0
        for spec in method.params:
            if spec.name not in searched:
                continue
            low, high = bounds.get(spec.name, spec.bounds_for(n_models))
            if spec.integer:
                low, high = float(round(low)), float(round(high))
            if not low < high:
                raise ValueError(f"bounds of '{spec.name}' must satisfy low < high, got [{low}, {high}]")
            start = init.get(spec.name, spec.default_for(n_models))
            if spec.name not in init:  # configured bounds may exclude the declared default: clip it
                start = min(max(start, low), high)
            if not low <= start <= high:
                raise ValueError(f"initial value {start} of '{spec.name}' lies outside its bounds [{low}, {high}]")
            n_values = n_models if spec.per_model and granularity != "global" else 1
            levels = int(high - low) + 1 if spec.integer else None
            size = len(group_names) * n_values
            genes.append(GeneRange(spec.name, offset, offset + size, low, high, levels, len(group_names)))
            starts[spec.name] = start
            offset += size
        unknown_options = set(options or {}) - set(method.option_names)
        if unknown_options:
            raise ValueError(
                f"merge method '{method.name}' has no option {sorted(unknown_options)[0]!r}"
                f" (it has: {', '.join(method.option_names) or 'none'})"
            )
        resolved_options = {**method.default_options(), **dict(options or {})}
        for spec in method.params:
            if spec.name not in searched and spec.name not in fixed:
                fixed[spec.name] = spec.default_for(n_models)
        return cls(
            method=method,
            n_models=n_models,
            granularity=granularity,
            group_names=group_names,
            tensor_groups=dict(zip(tensor_names, groups)),
            genes=genes,
            init=starts,
            fixed=fixed,
            options=resolved_options,
        )

    @property
    def dim(self) -> int:
        return sum(g.size for g in self.genes)

    def x0(self) -> np.ndarray:
        """The declared (or configured) starting values, in unit-cube coordinates."""
        return np.concatenate([np.full(g.size, g.to_unit(self.init[g.name])) for g in self.genes]) if self.genes else np.zeros(0)

    def summary(self) -> dict:
        """What the run store records of the space a population searches."""
        return {"method": self.method.name, "granularity": self.granularity, "dim": self.dim, "groups": self.group_names}

    def search_spec(self) -> SearchSpec:
        """The strategies' view of this space: dimension, start and where each parameter's genes lie."""
        return SearchSpec(self.dim, self.x0(), tuple(self.genes))

    def decode(self, genome: np.ndarray, seed: int | None = None) -> Recipe:
        genome = np.asarray(genome, dtype=np.float64)
        if genome.shape != (self.dim,):
            raise ValueError(f"genome has shape {genome.shape}, the space expects ({self.dim},)")
        unit = np.clip(genome, 0.0, 1.0)  # genomes outside the cube decode (and seed) as their clipped point
        values: dict[str, list[list[float]]] = {}
        for g in self.genes:
            chunk = unit[g.start : g.stop].reshape(g.groups, g.size // g.groups)
            scaled = g.to_real(chunk)
            if g.levels is not None:  # a discrete gene seeds as its bin's centre: same recipe, same seed
                unit[g.start : g.stop] = g.to_unit(scaled).reshape(-1)
            if self.method.param(g.name).per_model and g.size == g.groups:
                scaled = np.repeat(scaled, self.n_models, axis=1)
            values[g.name] = scaled.tolist()
        for name, value in self.fixed.items():
            width = self.n_models if self.method.param(name).per_model else 1
            values[name] = [[float(value)] * width for _ in self.group_names]
        ordered = {p.name: values[p.name] for p in self.method.params}
        return Recipe(
            method=self.method,
            group_names=list(self.group_names),
            values=ordered,
            options=dict(self.options),
            seed=genome_seed(unit) if seed is None else seed,
            tensor_groups=self.tensor_groups,
        )

    def recipe(self, values: Mapping[str, Sequence[float]], seed: int = 0) -> Recipe:
        """The recipe whose every group takes exactly ``values`` (one per expert for per-model
        parameters), declared defaults elsewhere: a point no genome needs to encode, such as one
        expert alone."""
        per_group = {
            p.name: [float(v) for v in values[p.name]] if p.name in values else
            [float(self.fixed.get(p.name, self.init.get(p.name, p.default_for(self.n_models))))]
            * (self.n_models if p.per_model else 1)
            for p in self.method.params
        }
        return Recipe(
            method=self.method,
            group_names=list(self.group_names),
            values={name: [list(v) for _ in self.group_names] for name, v in per_group.items()},
            options=dict(self.options),
            seed=seed,
            tensor_groups=self.tensor_groups,
        )

    def encode(self, values: Mapping[str, float | Sequence[float]]) -> np.ndarray:
        """The genome (unit cube) whose every group takes ``values`` — e.g. the uniform merge.

        ``values`` maps searched parameters to one value or one value per expert.
        """
        parts = []
        for g in self.genes:
            n_values = g.size // g.groups
            raw = np.asarray(values.get(g.name, self.init[g.name]), dtype=np.float64).reshape(-1)
            if raw.size not in (1, n_values):
                raise ValueError(
                    f"'{g.name}' takes one value or {n_values} (one per expert) in this space, got {raw.size}"
                )
            per_group = np.broadcast_to(raw, (n_values,))
            parts.append(g.to_unit(np.tile(per_group, g.groups)))
        return np.concatenate(parts) if parts else np.zeros(0)
