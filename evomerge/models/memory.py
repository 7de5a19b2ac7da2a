"""What a white-box worker will hold in memory, computed from model configs before any weight loads.

A worker keeps one working model, a copy of the base (the reference its task vectors are taken
from) and every expert resident for the whole run (with Fisher merging, each expert's diagonal
Fisher too); loading briefly holds one more expert. For a
method over LoRA factors the experts are adapters: the base plus one adapter-sized slot per expert. A run
whose workers cannot hold that is refused before it starts, with the figures, instead of dying
halfway through loading (or swapping a machine to a halt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.config import RunConfig
from evomerge.errors import InsufficientMemoryError
from evomerge.merge.method import LORA_FACTORS
from evomerge.models.adapters import is_adapter
from evomerge.models.checkpoint import run_dtype
from evomerge.models.loading import parameter_shapes, unreadable_weights

GIB = 1024**3
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
TIER = "device"
"""The memory tier a worker holds its experts in. Only the device tier exists so far: every model
resident on the worker's device (DESIGN.md §4 plans host-memory and memory-mapped tiers)."""


@dataclass(frozen=True)
class WorkerMemory:
    resident: int  # bytes held for the whole run
    peak: int  # bytes while the last expert loads
    description: str  # what is resident, in words, for the error message
    dtype: str  # the dtype the models are held in (models.dtype, resolved when auto)


def _numel(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def adapter_numel(ref: str) -> int:
    """Entries of a local adapter's factors, read from its safetensors header (no weights load)."""
    from safetensors import SafetensorError, safe_open

    path = Path(ref) / "adapter_model.safetensors"
    if not path.exists():  # a hub adapter: small beside its base, and not downloaded to be measured
        return 0
    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys())
    except SafetensorError as exc:
        raise unreadable_weights(str(path), exc) from None


def worker_memory(config: RunConfig) -> WorkerMemory:
    from evomerge.plan import RunPlan

    plan = RunPlan.from_config(config)
    dtype = run_dtype(config)
    itemsize = ITEMSIZE[dtype]
    refs = [config.model_ref(e.path) for e in config.models.experts]
    n = len(refs)
    shapes = parameter_shapes(plan.working_model)
    model = _numel(shapes) * itemsize
    if plan.method.inputs == LORA_FACTORS:
        adapters = [adapter_numel(ref) * itemsize for ref in refs]
        slot = adapters[0]
        return WorkerMemory(
            resident=model + slot + sum(adapters),
            peak=model + slot + sum(adapters) + max(adapters),
            description=f"the base, one working adapter and {n} adapters",
            dtype=dtype,
        )
    with_base = config.models.base is not None
    fishers = plan.method.needs_fisher  # one diagonal Fisher per expert
    merged_names = plan.space(list(shapes)).tensor_groups  # frozen towers have no resident copies
    merged = _numel({name: shape for name, shape in shapes.items() if name in merged_names}) * itemsize
    resident = model + merged * (n + with_base + n * fishers)
    # An adapter expert is built as a dense model on a fresh copy of the base.
    loading = model * (1 + any(is_adapter(ref) for ref in refs))
    return WorkerMemory(
        resident=resident,
        peak=resident + loading,
        description=f"the working model, {n} experts" + (" and the base" if with_base else "")
        + (" (their unfrozen towers)" if merged < model else "")
        + (f" and {n} Fishers" if fishers else ""),
        dtype=dtype,
    )


def available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the memory this machine can still give (None: unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config: RunConfig, workers: int, device: torch.device) -> WorkerMemory:
    """Refuse a run whose ``workers`` (sharing ``device``, or this machine's RAM) cannot hold the models."""
    need = worker_memory(config)
    have = available_bytes(device)
    if have is not None and need.peak * workers > have:
        where = f"{device} has" if device.type == "cuda" else "this machine has"
        chosen = "models.dtype auto: the checkpoints' own" if config.models.dtype == "auto" else "models.dtype"
        narrower = ", use models.dtype bfloat16" if need.dtype == "float32" else ""
        raise InsufficientMemoryError(
            f"models: each worker holds {need.peak / GIB:.2f} GiB at its peak ({need.description} in"
            f" {need.dtype} ({chosen}), memory tier '{TIER}': all resident on {device.type});"
            f" {workers} worker(s) need {need.peak * workers / GIB:.2f} GiB but {where} {have / GIB:.2f} GiB free;"
            f" lower workers.count{narrower}, merge fewer experts, or use a machine with more memory"
        )
    return need
