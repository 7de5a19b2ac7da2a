"""What a white-box worker will hold in memory, per memory tier, computed from model configs before
any weight loads; and the check that picks the tier a run uses.

A worker keeps one working model on its device and the experts (with a base, their task vectors
and the base; with Fisher merging, each expert's diagonal Fisher too) in one memory tier
(``evomerge.workers.tiers``): on the device, in host memory (copied to the device tensor by
tensor), or mapped from the checkpoints' safetensors files (read tensor by tensor, nothing kept).
The streaming tiers add one buffer per model read as large as the largest parameter tensor, or for
an elementwise method (a linear combination) as large as the blocks of elements they read it in
(``STREAM_BUFFER_SHARE`` of the model in all); kernels other than linear combinations add a few
chunk-sized work buffers in every tier, and those that rank magnitudes (TIES) a histogram's
buffers. Loading a held tier briefly holds one more expert where it is built: on a GPU, or when its
checkpoint must be converted to the run's dtype or is an adapter merged into the base (a
checkpoint read on the CPU in its own dtype stays in the page cache). For a
method over LoRA factors the experts are adapters: the base plus one adapter-sized slot per expert.

A data-flow worker holds its sources' layers and, per position of the longest path it may score,
a KV cache (:mod:`evomerge.models.path_memory`); a path length that cannot fit is refused naming
``merge.dataflow.max_layers`` and the longest that can.

The check takes the fastest tier that fits (``models.residency: auto``) or the one the config
names, and refuses a run that fits none before anything loads, with the figures, instead of dying
halfway through loading (or swapping a machine to a halt). A worker spanning several devices
(``models.devices``) holds the working model shard by shard (``evomerge.models.sharding``), so
each device is asked for its shard and what the tier keeps beside it, by the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from evomerge.config import RunConfig
from evomerge.errors import ConfigError, InsufficientMemoryError
from evomerge.merge.method import LORA_FACTORS
from evomerge.merge.resident import histogram_bytes
from evomerge.models import host_memory
from evomerge.models.adapters import is_adapter
from evomerge.models.checkpoint import run_dtype, stored_dtype
from evomerge.models.loading import meta_model, parameter_shapes, resolve_devices, unreadable_weights
from evomerge.models.sharding import Placement, ShardCost, ShardPlan, Unit, model_units, plan_shards
from evomerge.workers.materializer import block_elements, default_chunk, stream_budget
from evomerge.workers.tiers import TIERS, refused_tiers

GIB = 1024**3
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
WORK_ITEMSIZE = 8
"""Bytes per element of the kernels' chunk-sized work buffers, at their widest (float64 sums)."""


@dataclass(frozen=True)
class PathMemory:
    """What a data-flow path adds to a worker's memory (see :mod:`evomerge.models.path_memory`)."""

    per_position: int  # bytes of KV cache one path position holds for the largest batch
    positions: int  # the longest path counted: merge.dataflow.max_layers, else every slot
    shortest: int  # the head source's own depth: the initial path
    loading_peak: int  # bytes on the device while the sources load, before any path runs
    batch: str  # the batch the KV cache is counted for, in words
    bounded: bool  # merge.dataflow.max_layers is set (else every slot counts)


@dataclass(frozen=True)
class WorkerMemory:
    tier: str  # the memory tier the experts are held in
    device_peak: int  # bytes on the worker's device at its peak
    host_peak: int  # bytes of host memory besides the device's at its peak (the same memory on a CPU)
    resident: int  # bytes held for the whole run, device and host together
    description: str  # what is held where, in words, for messages
    dtype: str  # the dtype the models are held in (models.dtype, resolved when auto)
    cost: ShardCost | None = None
    """How the device figure grows with the weights one device holds (None: a worker that cannot
    span devices: a data-flow worker, adapter slots)."""
    shards: ShardPlan | None = None
    """For a worker spanning several devices: the module of each and every device's peak
    (``device_peak`` is the largest)."""
    path: PathMemory | None = None  # the data-flow space: what the path's length adds

    @property
    def peak(self) -> int:
        """Device and host peaks together: what a worker on a CPU needs of the machine's memory."""
        return self.device_peak + self.host_peak


@dataclass(frozen=True)
class FreeMemory:
    """What a worker may use: free bytes on its device and host memory available (None: unknown).
    On a CPU both are the machine's memory."""

    device: int | None
    host: int | None
    shards: tuple[int | None, ...] = ()
    """Free bytes on each device a worker spans (``models.devices`` > 1), the first one first."""
    kept_free: str = ""
    """What ``host`` leaves aside for something else that acts on memory pressure, in words for
    messages (see :meth:`keeping_free`)."""

    def keeping_free(self, reserve: int, why: str) -> "FreeMemory":
        """This memory less ``reserve`` bytes of host memory that must stay free (a monitor that kills
        workers once less is left, such as Ray's), named ``why`` in messages."""
        if self.host is None or reserve <= 0:
            return self
        kept = f"{self.kept_free} and" if self.kept_free else " after"
        return replace(self, host=max(0, self.host - reserve), kept_free=f"{kept} the {size(reserve)} {why}")

    @classmethod
    def measure(cls, device: torch.device, devices: int = 1) -> "FreeMemory":
        """Free memory now; a worker spanning ``devices`` devices uses the first ones of
        ``device``'s type that it sees."""
        host = available_bytes(torch.device("cpu"))
        if devices > 1:
            shards = tuple(available_bytes(torch.device(device.type, i)) for i in range(devices))
            return cls(shards[0], host, shards)
        return cls(available_bytes(device) if device.type == "cuda" else host, host)


def total_numel(shapes: dict[str, tuple[int, ...]]) -> int:
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


def tier_memory(config: RunConfig, device: torch.device) -> dict[str, WorkerMemory]:
    """A worker's memory in every tier the run may use, fastest first."""
    from evomerge.plan import RunPlan

    plan = RunPlan.from_config(config)
    dtype = run_dtype(config)
    itemsize = ITEMSIZE[dtype]
    if plan.dataflow:
        from evomerge.models.path_memory import dataflow_memory

        return {"device": dataflow_memory(config, device, dtype)}
    refs = [config.expert_model(e) for e in config.models.experts]
    n = len(refs)
    shapes = parameter_shapes(plan.working_model)
    numel = total_numel(shapes)
    model = numel * itemsize
    refused = refused_tiers(plan)
    largest_numel = max(int(torch.Size(s).numel()) for s in shapes.values())
    histogram = histogram_bytes(getattr(torch, dtype), largest_numel) if plan.method.magnitude_ranks else 0
    spans = config.models.devices
    on = f"on {device.type}" if spans == 1 else f"on {spans} {device.type} devices"
    beside = f"on {device.type}" if spans == 1 else "beside its shards"
    where = {"device": beside, "host": "in host memory", "mmap": "mapped from their files"}
    costs: dict[str, ShardCost] = {}  # none for adapters: a worker spanning devices merges full models
    # per tier: (device peak, host peak, held for the whole run)
    if plan.method.inputs == LORA_FACTORS:
        adapters = [adapter_numel(ref) * itemsize for ref in refs]
        base_and_slot = model + adapters[0]  # the base and one working adapter
        slots = sum(adapters)
        figures = {
            "device": (base_and_slot + slots + max(adapters) + histogram, 0, base_and_slot + slots),
            "host": (base_and_slot + max(adapters) + histogram, slots + max(adapters), base_and_slot + slots),
        }
        experts = f"{n} adapters"
    else:
        with_base = config.models.base is not None
        fishers = plan.method.needs_fisher
        rows = n + with_base + n * fishers  # model-sized rows the experts take in a held tier
        chunk = default_chunk(device.type, numel, n)
        # M2N2's seed recipes start from Gram matrices of whole tensors; others stream in blocks
        blocked = plan.method.elementwise and not plan.seed_recipe_populations
        largest = largest_numel * itemsize
        block = block_elements(chunk, itemsize, stream_budget(model, n, with_base)) * itemsize if blocked else None
        # a linear combination is written in place, one op per expert and chunk: no work buffers but,
        # for half-precision weights, the float32 chunk it sums in
        linear_work = chunk * ITEMSIZE["float32"] if itemsize < ITEMSIZE["float32"] else 0
        work = (linear_work if plan.method.elementwise else (n + 2) * chunk * WORK_ITEMSIZE) + histogram
        # an expert is built in memory when converted to the run's dtype or an adapter (merged on a
        # fresh copy of the base); else loading reads its file through the page cache
        built = any(is_adapter(ref) or stored_dtype(ref) != dtype for ref in refs)
        merged_names = plan.space(list(shapes)).tensor_groups  # frozen towers have no expert copies
        merged = total_numel({name: shape for name, shape in shapes.items() if name in merged_names}) * itemsize
        held = model + merged * rows
        costs = {  # what a device needs for the weights it holds (all of them, on one device)
            "device": ShardCost(held_rows=rows, work=work, loading=built or device.type == "cuda"),
            "host": ShardCost(stream_rows=rows, stream_cap=block, work=work),
            "mmap": ShardCost(stream_rows=n + with_base, stream_cap=block, work=work),
        }
        figures = {
            "device": (costs["device"].need(model, merged, largest), 0, held),
            "host": (costs["host"].need(model, merged, largest), merged * rows + model * built, held),
            "mmap": (costs["mmap"].need(model, merged, largest), 0, model),
        }
        experts = (
            f"{n} experts" + (" and the base" if with_base else "") + (" (their unfrozen towers)" if merged < model else "")
            + (f" and {n} Fishers" if fishers else "")
        )
    return {
        tier: WorkerMemory(
            tier=tier,
            device_peak=figures[tier][0],
            host_peak=figures[tier][1],
            resident=figures[tier][2],
            description=f"the working model {on}, {experts} {where[tier]}",
            dtype=dtype,
            cost=costs.get(tier),
        )
        for tier in TIERS
        if tier in figures and tier not in refused
    }


def available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the memory this machine (within this process's cgroup)
    can still give (None: unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_memory.available_bytes()


def total_bytes() -> int | None:
    """This machine's memory (within this process's cgroup; None: unknown)."""
    return host_memory.total_bytes()


def size(n_bytes: int) -> str:
    """A memory figure for messages: GiB, or MiB below one GiB (small models would read 0.00 GiB)."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def _shortfall(need: WorkerMemory, workers: int, device: torch.device, free: FreeMemory) -> str | None:
    """Why ``workers`` such workers do not fit in ``free`` (None: they fit, or it is unknown)."""
    if device.type != "cuda":
        if free.host is not None and need.peak * workers > free.host:
            return f"{size(need.peak * workers)} but this machine has {size(free.host)} free{free.kept_free}"
        return None
    if free.device is not None and need.device_peak * workers > free.device:
        return f"{size(need.device_peak * workers)} of {device} but it has {size(free.device)} free"
    if free.host is not None and need.host_peak * workers > free.host:
        return f"{size(need.host_peak * workers)} of host memory but {size(free.host)} is available{free.kept_free}"
    return None


def check_memory(
    config: RunConfig, workers: int, device: torch.device, free: FreeMemory | None = None
) -> WorkerMemory:
    """The memory tier ``workers`` workers (sharing ``device``, or this machine's RAM) hold the
    experts in, with its figures: ``models.residency``, or with ``auto`` the fastest that fits in
    ``free`` (measured when not given). A worker spanning several devices (``models.devices``) is
    checked device by device, each holding its shard of the working model and what the tier keeps
    beside it; the figures then carry its shard plan. A run that fits no tier is refused with the
    figures."""
    tiers = tier_memory(config, device)
    residency = config.models.residency
    if residency != "auto" and residency not in tiers:
        from evomerge.plan import RunPlan

        why = refused_tiers(RunPlan.from_config(config))[residency]
        raise ConfigError(f"models.residency is {residency} but {why}; use {' or '.join(tiers)}")
    candidates = list(tiers.values()) if residency == "auto" else [tiers[residency]]
    spans = config.models.devices
    free = FreeMemory.measure(device, spans) if free is None else free
    assert spans == 1 or len(free.shards) == spans, "FreeMemory.shards: one figure per device a worker spans"
    units = working_units(config) if spans > 1 else []
    shortfalls = []
    for need in candidates:
        if spans > 1:
            need, short = _sharded(need, units, workers, device, free)
        else:
            short = _shortfall(need, workers, device, free)
        if short is None:
            return need
        shortfalls.append(f"memory tier '{need.tier}' ({need.description}) needs {short}")
    if candidates[0].path is not None:
        _refuse_path_length(candidates[0], workers, device, free)
    dtype = candidates[0].dtype
    chosen = "models.dtype auto: the checkpoints' own" if config.models.dtype == "auto" else "models.dtype"
    narrower = ", use models.dtype bfloat16" if dtype == "float32" else ""
    fewer = "raise models.devices" if spans > 1 else "lower workers.count"
    raise InsufficientMemoryError(
        f"models: {workers} worker(s) holding the models in {dtype} ({chosen}) fit no memory tier"
        f" (models.residency {residency}): {'; '.join(shortfalls)};"
        f" {fewer}{narrower}, merge fewer experts, or use a machine with more memory"
    )


def working_units(config: RunConfig) -> list[Unit]:
    """The working model's units a worker spanning devices places whole (decoder layers, leaf
    modules), with their sizes in the run's dtype; from the config alone (no weights are read)."""
    from evomerge.plan import RunPlan

    plan = RunPlan.from_config(config)
    model = meta_model(plan.working_model)
    merged = plan.space([name for name, _ in model.named_parameters()]).tensor_groups
    return model_units(model, ITEMSIZE[run_dtype(config)], set(merged))


def _sharded(
    need: WorkerMemory, units: list[Unit], workers: int, device: torch.device, free: FreeMemory
) -> tuple[WorkerMemory, str | None]:
    """``need`` for a worker spanning ``len(free.shards)`` devices: its shard plan within their free
    memory, or (with why it does not fit) the balanced plan they would need."""
    assert need.cost is not None, "the plan refuses models.devices for workers that cannot span devices"
    plan = plan_shards(units, need.cost, free.shards)
    best = plan or plan_shards(units, need.cost, [None] * len(free.shards))
    assert best is not None  # unbounded devices hold anything
    sharded = replace(need, device_peak=max(best.peaks), shards=best)
    names = f"{device.type}:0 to {device.type}:{len(free.shards) - 1}"
    if plan is None:
        return sharded, (
            f"{_sizes(best.peaks)} of {names} at best (decoder layers whole)"
            f" but they have {_sizes(free.shards)} free"
        )
    if free.host is not None and need.host_peak * workers > free.host:
        return sharded, f"{size(need.host_peak * workers)} of host memory but {size(free.host)} is available{free.kept_free}"
    return sharded, None


def _sizes(figures: Sequence[int | None]) -> str:
    return ", ".join("unknown" if f is None else size(f) for f in figures)


def _refuse_path_length(need: WorkerMemory, workers: int, device: torch.device, free: FreeMemory) -> None:
    """A data-flow run whose sources fit but whose longest paths' KV cache does not is refused
    naming ``merge.dataflow.max_layers`` and the longest paths that fit; returns where even the
    sources alone do not (the general refusal says so)."""
    from evomerge.models.path_memory import with_path_length

    path = need.path
    assert path is not None
    fitting = [n for n in range(path.shortest, path.positions) if _shortfall(with_path_length(need, n), workers, device, free) is None]
    if not fitting:
        return
    counted = "merge.dataflow.max_layers" if path.bounded else "every slot, as merge.dataflow.max_layers is unset"
    raise InsufficientMemoryError(
        f"merge.dataflow.max_layers: {workers} worker(s) scoring paths of up to {path.positions} layers ({counted}) need"
        f" {_shortfall(need, workers, device, free)}: {size(need.resident)} of weights and {size(path.per_position)} of KV"
        f" cache per path layer ({path.batch}); set merge.dataflow.max_layers to {fitting[-1]} or less, or lower"
        " fitness.options.batch_size"
    )


def summary(need: WorkerMemory, device: torch.device) -> str:
    """The chosen tier and its figures, for the run's phase line and log."""
    if need.shards is not None:
        devices = f"{len(need.shards.peaks)} {device.type} devices"
        figures = f"{_sizes(need.shards.peaks)} of its {devices} and {size(need.host_peak)} of host memory"
    elif device.type == "cuda":
        figures = f"{size(need.device_peak)} of {device.type} and {size(need.host_peak)} of host memory"
    else:
        figures = size(need.peak)
    return f"memory tier {need.tier}: {need.description}, {figures} per worker at its peak"


def worker_placement(config: RunConfig) -> tuple[str, Placement]:
    """The tier a worker holds the experts in, and where its working model lives. The tier is the
    one its config names (an executor writes the tier its check chose there), or for ``auto`` the
    check's choice for this worker alone; a worker spanning devices plans its shards for the free
    memory of the devices it sees now."""
    devices = resolve_devices(config.models.device, config.models.devices)
    if len(devices) == 1 and config.models.residency != "auto":
        return config.models.residency, Placement(devices)
    need = check_memory(config, 1, devices[0])
    return need.tier, Placement(devices, None if need.shards is None else need.shards.device_map)


def with_residency(config: RunConfig, tier: str) -> RunConfig:
    """``config`` with ``models.residency`` set to the tier the check chose, as workers are handed it."""
    return config.model_copy(update={"models": config.models.model_copy(update={"residency": tier})})
