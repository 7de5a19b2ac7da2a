"""A decoded recipe as a mergekit configuration, for users who rebuild merges with mergekit.

mergekit is LGPL and optional: this module only writes its YAML schema (``merge_method``,
``base_model``, ``models[].parameters``, ``parameters``, ``dtype``), it never imports mergekit.
Values that differ between tensor groups become mergekit's conditional parameters: a list of
``{filter, value}`` entries, where a filter matches tensors whose name contains it. Whole
transformer blocks are matched by their prefix (``model.layers.3.``), other tensors by their full
name. mergekit gives a tensor the value of the first filter its name contains, and that must be
its own group's for every tensor (a filter inside another group's name is refused), so the
mergekit merge is ours. The names
are the checkpoint's (what mergekit reads), each paired with the parameter transformers loads it
into (renamed on load in transformers 5: Gemma 3's ``language_model.model.layers.0.`` is the
parameter ``model.language_model.layers.0.``). Where transformers fuses or splits tensors on load,
no filter could say which is which, and the recipe is not expressible. A LoRA adapter
expert is mergekit's ``BASE+ADAPTER`` (merged into its base by mergekit, in a ``--lora-merge-cache``).

A data-flow path with every scale 1 is mergekit's ``passthrough`` over slices of the sources'
layers. Methods mergekit does not have (seed recipes, split-point SLERP, LoRA composition, layer swaps,
TALL, PCB, Fisher) are not expressible; the caller says so in the export instead of writing a YAML
that would build a different model.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from evomerge.merge import MergeMethod
from evomerge.space.merge_space import Recipe
from evomerge.space.paths import Path

# Everything up to and including the first numbered segment: the block index space.layer_index reads.
_BLOCK_PREFIX = re.compile(r"^(?:.*?\.)?\d+\.")


class NotExpressible(ValueError):
    """The recipe has no mergekit equivalent; the message says why."""


def _block_prefix(tensor_name: str) -> str | None:
    """The transformer block a tensor belongs to, as a filter (``model.layers.3.``), if any."""
    match = _BLOCK_PREFIX.match(tensor_name)
    return match.group(0) if match else None


def _group_filters(tensor_names: Sequence[str], tensor_groups: dict[str, int]) -> dict[int, list[str]]:
    """Per group, the shortest filters that match its tensors and nothing else."""
    blocks: dict[str, set[int]] = {}  # block prefix -> groups of its tensors
    for name in tensor_names:
        prefix = _block_prefix(name)
        if prefix is not None:
            blocks.setdefault(prefix, set()).add(tensor_groups[name])
    filters: dict[int, list[str]] = {}
    whole_blocks = {prefix: next(iter(groups)) for prefix, groups in blocks.items() if len(groups) == 1}
    for prefix, group in whole_blocks.items():
        filters.setdefault(group, []).append(prefix)
    for name in tensor_names:
        if _block_prefix(name) not in whole_blocks:
            filters.setdefault(tensor_groups[name], []).append(name)
    order = [(f, g) for g in sorted(filters) for f in filters[g]]  # as _setting writes them
    for name in tensor_names:  # mergekit takes the first filter a name contains
        first = next(g for f, g in order if f in name)
        if first != tensor_groups[name]:
            raise NotExpressible(f"a filter of another tensor group is part of the name '{name}', so mergekit would give it that group's values")
    return filters


def model_reference(ref: str, base: str | None, adapter: bool) -> str:
    """How mergekit names a model: its path or hub id, or ``BASE+ADAPTER`` for a LoRA adapter."""
    for part in (ref, base or ""):
        if "+" in part:
            raise NotExpressible(f"mergekit reads '+' in a model reference as BASE+ADAPTER, and '{part}' has one")
    return f"{base}+{ref}" if adapter else ref


def _stored_groups(stored: Mapping[str, str | None], tensor_groups: Mapping[str, int]) -> dict[str, int]:
    """The group of every stored tensor, by the merged parameter it loads into."""
    groups: dict[str, int] = {}
    for key, parameter in stored.items():
        if parameter is None:
            raise NotExpressible(f"transformers converts the checkpoint's tensor '{key}' on load (fuses, splits or reshapes it)")
        if parameter not in tensor_groups:
            raise NotExpressible(f"the checkpoint's tensor '{key}' is not a parameter the merge wrote")
        groups[key] = tensor_groups[parameter]
    loaded = set(stored.values())
    for name in tensor_groups:
        if name not in loaded:
            raise NotExpressible(f"the merged parameter '{name}' is not stored in the checkpoint mergekit reads")
    return groups


def _setting(per_group: list[float], filters: dict[int, list[str]]) -> Any:
    if len(set(per_group)) == 1:
        return float(per_group[0])
    return [{"filter": f, "value": float(v)} for g, v in enumerate(per_group) for f in filters.get(g, [])]


def mergekit_config(
    recipe: Recipe,
    method: MergeMethod,
    stored: Mapping[str, str | None],
    base: str | None,
    experts: Sequence[str],
    dtype: str,
) -> dict[str, Any]:
    """The mergekit configuration that builds the same model as ``recipe``.

    ``stored`` maps the tensors the working model's checkpoint stores to the parameters they load
    into (:func:`evomerge.models.checkpoint.stored_parameters`); ``experts`` are mergekit model
    references (:func:`model_reference`).
    """
    if method.mergekit_name is None:
        raise NotExpressible(f"mergekit has no equivalent of the merge method '{method.name}'")
    groups = _stored_groups(stored, recipe.tensor_groups)
    filters = _group_filters(list(groups), groups)
    n_groups = len(recipe.group_names)
    models = [{"model": ref} for ref in experts]
    shared: dict[str, Any] = {}
    for spec in method.params:
        values = recipe.values[spec.name]
        if spec.per_model:
            for i, model in enumerate(models):
                model.setdefault("parameters", {})[spec.name] = _setting([values[g][i] for g in range(n_groups)], filters)
        else:
            shared[spec.name] = _setting([values[g][0] for g in range(n_groups)], filters)
    shared.update({name: bool(value) for name, value in recipe.options.items()})
    config: dict[str, Any] = {"merge_method": method.mergekit_name}
    if method.mergekit_name == "slerp":  # mergekit's t = 0 is its base model: our first expert
        config["base_model"] = experts[0]
    elif method.needs_base:
        if base is None:
            raise NotExpressible(f"'{method.name}' needs the base model")
        config["base_model"] = base
    config["models"] = models
    if shared:
        config["parameters"] = shared
    config["dtype"] = dtype
    return config


def passthrough_config(
    path: Path,
    sources: Sequence[str | None],
    dtype: str,
    head: int = 0,
    layer_types: tuple[Sequence[str] | None, Sequence[str] | None] = (None, None),
) -> dict[str, Any]:
    """The mergekit ``passthrough`` configuration that stacks the layers of a data-flow ``path``.

    Runs of consecutive layers of one source become one slice (``layer_range`` is half-open), and
    a slice may repeat layers another already took. mergekit takes the embeddings from the first
    slice's model and the final norm and head from the last one's; ours are the head source's,
    so an empty slice of it opens or closes the list where a path starts or ends elsewhere.
    ``sources`` are the model references, None for a source mergekit cannot read (a recorded
    merge: a run's best or an export's recipe). ``layer_types`` are the head source's config's
    ``layer_types`` (each layer's attention: sliding or full; Qwen2/3, Gemma 2/3 in transformers
    5) and the path's: mergekit's config is the first slice's with only the layer count changed,
    so where the two lists differ its model would fail to save or attend differently.
    """
    if any(scale != 1.0 for scale in path.scales):
        raise NotExpressible("passthrough copies layers unscaled and this path scales the hidden state")
    head_types, path_types = layer_types
    if head_types is not None and list(head_types) != list(path_types or ()):
        raise NotExpressible(
            "mergekit keeps the head source's layer_types (each layer's attention type) and changes only the"
            " layer count, and this path's layers have other types or another count"
        )
    used = {source for source, _ in path.layers} | {head}
    missing = [i for i in sorted(used) if sources[i] is None]
    if missing:
        name = path.source_labels[missing[0]] if path.source_labels else str(missing[0])
        raise NotExpressible(
            f"source '{name}' is a recorded merge (run or recipe), not a model mergekit can read (name its export's directory as path)"
        )
    runs: list[list[int]] = []  # [source, start, stop]
    for source, layer in path.layers:
        if runs and runs[-1][0] == source and runs[-1][2] == layer:
            runs[-1][2] += 1
        else:
            runs.append([source, layer, layer + 1])
    if runs[0][0] != head:
        runs.insert(0, [head, 0, 0])
    if runs[-1][0] != head:
        runs.append([head, 0, 0])
    slices = [{"sources": [{"model": sources[s], "layer_range": [start, stop]}]} for s, start, stop in runs]
    return {"slices": slices, "merge_method": "passthrough", "dtype": dtype}
