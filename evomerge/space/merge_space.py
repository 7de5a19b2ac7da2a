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

In a model of several towers (an image-text model: language model, vision tower, projector; see
``towers``) layer groups are formed per stack of layers, and ``frozen`` towers keep the working
model's weights: the merge leaves their tensors out, whatever the granularity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from evomerge.merge.method import MergeMethod
from evomerge.records import genome_hash
from evomerge.space.genes import GeneRange, SearchSpec
from evomerge.space.towers import Towers, stack_positions

GRANULARITIES = ("global", "per_model", "per_layer_group", "per_tensor")


def layer_index(tensor_name: str) -> int | None:
    """The transformer-block index in a parameter name (``model.layers.7.mlp…`` → 7)."""
    return layer_indices([tensor_name])[0]


def layer_indices(tensor_names: Sequence[str]) -> list[int | None]:
    """Per tensor of one model, its block's index, or None outside the stacks of blocks (a number
    in an ``nn.Sequential`` projector is not one; see :func:`evomerge.space.towers.stack_positions`)."""
    return [position[1] if position else None for position in stack_positions(tensor_names)]


def _contiguous(n_layers: int, k: int) -> list[int]:
    """The group of each of ``n_layers`` layers split into ``k`` groups of consecutive layers."""
    return [layer * k // n_layers for layer in range(n_layers)]


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"


def group_tensors(
    tensor_names: Sequence[str], granularity: str, layer_groups: int | None, frozen: Sequence[str] = ()
) -> tuple[list[str], list[int | None]]:
    """Group names and, per tensor (in model order), the index of its group; None for a tensor of
    a frozen tower (see :mod:`evomerge.space.towers`), which keeps the working model's weights."""
    towers = Towers.of(tensor_names)
    merged = _merged(tensor_names, towers, frozen)
    if granularity in ("global", "per_model"):
        return ["all"], [0 if keep else None for keep in merged]
    if granularity == "per_tensor":
        kept = [n for n, keep in zip(tensor_names, merged) if keep]
        index = {n: i for i, n in enumerate(kept)}
        return kept, [index.get(n) if keep else None for n, keep in zip(tensor_names, merged)]
    if towers is None:
        return _single_stack_groups(tensor_names, layer_groups)
    labels = _tower_group_labels(tensor_names, towers, layer_groups)
    kept_labels = [label for label, keep in zip(labels, merged) if keep]
    names = list(dict.fromkeys(kept_labels))
    index = {name: i for i, name in enumerate(names)}
    return names, [index[label] if keep else None for label, keep in zip(labels, merged)]


def _merged(tensor_names: Sequence[str], towers: Towers | None, frozen: Sequence[str]) -> list[bool]:
    """Per tensor, whether the merge writes it (its tower is not frozen)."""
    if not frozen:
        return [True] * len(tensor_names)
    if towers is None:
        raise ValueError("frozen: this model has a single stack of numbered layers, no towers to freeze")
    known = towers.names(tensor_names)
    for name in frozen:
        if name not in known:
            raise ValueError(f"frozen: '{name}' is not a tower of this model (towers: {', '.join(known)})")
    if set(known) <= set(frozen):
        raise ValueError("frozen: every tower of the model is frozen, which leaves nothing to merge")
    return [towers.tower(n) not in frozen for n in tensor_names]


def _layer_count(k: int | None, n_layers: int) -> int:
    if k is not None and not 1 <= k <= n_layers:
        raise ValueError(f"layer_groups must be between 1 and the model's {n_layers} layers, got {k}")
    return n_layers if k is None else k


def _single_stack_groups(tensor_names: Sequence[str], layer_groups: int | None) -> tuple[list[str], list[int | None]]:
    """k groups of consecutive layers; tensors outside the layers join the first group if they
    come before them, the last otherwise."""
    layers = layer_indices(tensor_names)
    found = sorted({i for i in layers if i is not None})
    if not found:
        raise ValueError("granularity per_layer_group: no numbered layers found in the model's tensor names")
    n_layers = found[-1] + 1
    k = _layer_count(layer_groups, n_layers)
    group_of_layer = _contiguous(n_layers, k)
    first_layer_pos = next(i for i, layer in enumerate(layers) if layer is not None)
    groups: list[int | None] = []
    for pos, layer in enumerate(layers):
        if layer is not None:
            groups.append(group_of_layer[layer])
        else:
            groups.append(0 if pos < first_layer_pos else k - 1)
    names = []
    for g in range(k):
        members = [layer for layer in range(n_layers) if group_of_layer[layer] == g]
        names.append(f"layers {_span(members)}" if len(members) > 1 else f"layer {members[0]}")
    return names, groups


def _tower_group_labels(tensor_names: Sequence[str], towers: Towers, layer_groups: int | None) -> list[str]:
    """Per tensor, the name of its layer group in a model of several towers.

    Each stack is split into ``layer_groups`` groups of consecutive layers (a stack with fewer
    layers: one group per layer), named by the stack and its layers (``vision_tower.encoder.layers.0-1``).
    A tower's tensors outside its stacks join its first group if they come before its layers, its
    last group otherwise; a tower without layers (a projector) is one group of its own name.
    """
    positions = stack_positions(tensor_names)
    depth = {stack: 1 + max(p[1] for p in positions if p is not None and p[0] == stack) for stack in towers.stacks}
    _layer_count(layer_groups, max(depth.values()))
    labels_of_stack = {}
    for stack, n_layers in depth.items():
        k = n_layers if layer_groups is None else min(layer_groups, n_layers)
        group_of_layer = _contiguous(n_layers, k)
        spans = {g: _span([layer for layer in range(n_layers) if group_of_layer[layer] == g]) for g in range(k)}
        labels_of_stack[stack] = [f"{towers.stack_name(stack)}.{spans[g]}" for g in group_of_layer]
    layered: dict[str, list[int]] = {}  # per tower, the positions of its tensors inside stacks
    for pos, (name, position) in enumerate(zip(tensor_names, positions)):
        if position is not None:
            layered.setdefault(towers.tower(name), []).append(pos)
    labels = []
    for pos, (name, position) in enumerate(zip(tensor_names, positions)):
        tower = towers.tower(name)
        if position is not None:
            labels.append(labels_of_stack[position[0]][position[1]])
        elif tower not in layered:
            labels.append(tower)
        else:
            neighbour = layered[tower][0] if pos < layered[tower][0] else layered[tower][-1]
            stack, layer = positions[neighbour]  # type: ignore[misc]
            labels.append(labels_of_stack[stack][layer])
    return labels


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
    """The group of every tensor the merge writes, in model order (frozen towers' are left out)."""
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
        frozen: Sequence[str] = (),
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
        group_names, groups = group_tensors(tensor_names, granularity, layer_groups, frozen)
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
            tensor_groups={name: g for name, g in zip(tensor_names, groups) if g is not None},
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
