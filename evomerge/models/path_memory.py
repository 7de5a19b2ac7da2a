"""What a data-flow worker holds in memory, from the sources' configs and the fitness's data.

A path points at the sources' resident layers and copies no weight, but every position of it
keeps its own KV cache while a batch is scored (a forward pass or a generation fills one entry
per position and token): 2 × kv_heads × head_dim values per token, for the batch's rows and
tokens. Everything else a forward pass makes (the residual stream, a layer's intermediate
activations, the logits) lives one layer at a time under ``no_grad``, whatever the path's length,
and is no more counted here than in the parameter space's estimate. So the longest admissible path
(``merge.dataflow.max_layers``, else every slot) sets the worker's peak beside the weights, and
:func:`evomerge.models.memory.check_memory` refuses a path length that cannot fit, naming the
longest that can.

The batch is the fitness's ``batch_size`` (its option, else its default) rows of its longest
example, in tokens of the head source's tokenizer, plus the ``max_new_tokens`` it generates: known
before the workers start for text rows in local files (``fitness.data``, ``test_data``, ``tasks``).
For examples that are not (arrays, hub datasets, lm-eval tasks) the KV cache is not estimated and
the figures say so.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from evomerge.config import RunConfig
from evomerge.models.loading import load_config, load_tokenizer, parameter_shapes
from evomerge.models.memory import ITEMSIZE, PathMemory, WorkerMemory, total_numel


def dataflow_memory(config: RunConfig, device: torch.device, dtype: str) -> WorkerMemory:
    """A data-flow worker holds the head source whole and the other sources' decoder layers on its
    device, and the KV cache of its longest admissible path. Sources load whole, one after another,
    before the others' embeddings and heads are dropped; a run or recipe source is first rebuilt by
    the worker of the config that merged it (its fastest tier's peak, then its merged model)."""
    from evomerge.models.memory import tier_memory
    from evomerge.plan import RunPlan
    from evomerge.source_merges import recorded_merge
    from evomerge.space.merge_space import layer_indices

    itemsize = ITEMSIZE[dtype]
    head = config.head
    resident, loading_peak, host_peak, loaded = 0, 0, 0, 0
    for i, expert in enumerate(config.models.experts):
        shapes = parameter_shapes(config.expert_model(expert))
        whole = total_numel(shapes) * itemsize
        if expert.path is not None:
            loading_peak = max(loading_peak, loaded + whole)
        else:
            rebuilt = next(iter(tier_memory(recorded_merge(config, expert).config, device).values()))
            loading_peak, host_peak = max(loading_peak, loaded + rebuilt.device_peak), max(host_peak, rebuilt.host_peak)
        loaded += whole
        resident += whole if i == head else total_numel({k: v for (k, v), index in zip(shapes.items(), layer_indices(list(shapes))) if index is not None}) * itemsize
    space = RunPlan.from_config(config).path_space()
    batch = scored_batch(config)
    rows, tokens = batch if batch is not None else (0, 0)
    path = PathMemory(
        per_position=rows * tokens * kv_values_per_token(config) * itemsize,
        positions=space.max_layers or len(space.slots),
        shortest=space.layer_counts[head],
        loading_peak=loading_peak,
        batch=f"batches of {rows} × {tokens} tokens" if batch is not None else "not estimated for this fitness's examples",
        bounded=space.max_layers is not None,
    )
    n = len(config.models.experts)
    need = WorkerMemory(
        tier="device",
        device_peak=0,
        host_peak=host_peak,
        resident=resident,
        description=(
            f"the head source and the decoder layers of {n - 1} more on {device.type}, and the KV cache of"
            f" paths of up to {path.positions} layers ({path.batch})"
        ),
        dtype=dtype,
        path=path,
    )
    return with_path_length(need, path.positions)


def with_path_length(need: WorkerMemory, positions: int) -> WorkerMemory:
    """``need`` for paths of at most ``positions`` layers: the resident weights and their KV cache,
    or the sources' loading, whichever is more."""
    from dataclasses import replace

    path = need.path
    assert path is not None
    kv = positions * path.per_position
    return replace(
        need,
        device_peak=max(path.loading_peak, need.resident + kv),
        path=replace(path, positions=positions),
    )


def kv_values_per_token(config: RunConfig) -> int:
    """Values one path position caches per token (keys and values), at the widest source's layers."""
    widest = 0
    for expert in config.models.experts:
        text = load_config(config.expert_model(expert)).get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        widest = max(widest, 2 * kv_heads * head_dim)
    return widest


def scored_batch(config: RunConfig) -> tuple[int, int] | None:
    """(rows, tokens) of the largest batch the fitness scores, or None where its examples are not
    known as text before the workers start (see the module docstring)."""
    from evomerge.fitness import brings_own_examples, resolve_fitness
    from evomerge.fitness.data import read_examples

    fitness = config.fitness
    if brings_own_examples(fitness.name):
        return None
    parameters = inspect.signature(resolve_fitness(fitness.name)).parameters
    batch_size = _setting(parameters, fitness.options, "batch_size")
    if batch_size is None:
        return None
    generated = _setting(parameters, fitness.options, "max_new_tokens") or 0
    sections = [fitness.data, fitness.test_data, *fitness.tasks.values()]
    sets = [
        read_examples(
            data.source, data.split, data.classes, data.limit, config.base_dir,
            template=data.template, target=data.target, choices=data.choices, label=data.label,
        )
        for data in sections
        if data is not None and not data.source.startswith("hf:")
    ]
    rows = [examples for examples in sets if isinstance(examples, list)]  # text rows, not arrays
    tokenizer = load_tokenizer(config.expert_model(config.models.experts[config.head])) if rows else None
    if tokenizer is None:
        return None
    longest = max(len(tokenizer(_longest_text(row))["input_ids"]) for examples in rows for row in examples)
    return min(batch_size, max(len(examples) for examples in rows)), longest + generated


def _setting(parameters, options: dict[str, Any], name: str) -> int | None:
    """A fitness's keyword setting: the config's option, else the function's default (None: it
    takes no such setting)."""
    if name in options:
        return int(options[name])
    parameter = parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return int(parameter.default)


def _longest_text(row: dict[str, Any]) -> str:
    """The longest sequence a row becomes: its prompt and its longest continuation."""
    continuations = [row["target"]] if "target" in row else []
    continuations += row.get("choices", [])
    return row["prompt"] + max(continuations, key=len, default="")
