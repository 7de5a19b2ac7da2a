"""A working model larger than one device: which device holds each of its modules, and what each
device then needs.

DESIGN.md §4. A worker spanning several devices (``models.devices``) loads its working model with a
transformers device map (module name → device) and keeps what its memory tier holds of each tensor
on that tensor's device, so that a merge reads and writes one device per tensor; forward passes
then cross devices as any device-mapped transformers model does.

The plan places the units transformers and accelerate never split: the model's
``_no_split_modules`` (its decoder layers) and leaf modules (embeddings, norms, the head) whole,
a tied module with the module it shares weights with. Each device holds a contiguous run of
units in model order, so a forward pass crosses each device boundary once, the embeddings start
on the first device and the head ends on the last. Of those splits the plan takes the one whose
largest device peak is smallest within every device's capacity: a binary search over that peak,
filling devices greedily (exact for contiguous splits, since a device's need only grows as it
takes units), so the devices end up balanced.

Why not ``accelerate.infer_auto_device_map`` (what ``from_pretrained(device_map="auto")`` runs):
it prices a module at its parameters' bytes, but a worker's device also holds what its memory
tier keeps beside each shard: in the device tier every merged tensor once more per expert (and
the base) while frozen towers have no copies, in the streaming tiers buffers as large as the
device's largest tensor, and the kernels' work buffers on every device that merges. No single
scaling of its budgets prices that. It also keeps room on the first device for layers offloaded
to the CPU (a worker offloads nothing) and sends what does not fit to "disk" instead of refusing.
The device map this module writes has the same form, and ``from_pretrained`` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch


@dataclass(frozen=True)
class Unit:
    """Modules placed together on one device: a decoder layer, a leaf module, or a parameter a
    module with children holds itself. Sizes are bytes in the run's dtype."""

    name: str  # the device map's key: a module (or parameter) name
    size: int  # its parameters; a tied parameter counts once, in the unit where it first appears
    merged: int  # of those, the ones merges write (frozen towers keep the working model's)
    largest: int  # its largest parameter tensor
    tied_to: str | None = None  # the unit whose parameters this one shares: placed with it


@dataclass(frozen=True)
class ShardCost:
    """What one device needs for the units it holds: their weights, and what the memory tier keeps
    beside them (one ``ShardCost`` per tier, from ``evomerge.models.memory``)."""

    held_rows: int = 0
    """Copies of each merged tensor the tier keeps on its device (the device tier: experts, base, Fishers)."""
    stream_rows: int = 0
    """Buffers as large as the device's largest tensor that a streaming tier reads each model into."""
    stream_cap: int | None = None
    """Most bytes of one streamed buffer: an elementwise method is read in blocks of at most this."""
    work: int = 0
    """Bytes of the kernels' work buffers, on every device that holds a merged tensor."""
    loading: bool = False
    """Whether building the tier briefly holds one more expert's shard on the device."""

    def need(self, size: int, merged: int, largest: int) -> int:
        """Bytes at its peak for a device holding weights of ``size`` bytes (``merged`` of them
        merged) whose largest tensor has ``largest`` bytes."""
        streamed = largest if self.stream_cap is None else min(largest, self.stream_cap)
        spare = max(size * self.loading, self.work if merged else 0)
        return size + merged * self.held_rows + streamed * self.stream_rows + spare


@dataclass(frozen=True)
class ShardPlan:
    """Where a worker's working model lives, unit by unit, and what each device then needs."""

    device_map: dict[str, int]  # unit name → device index, in model order
    peaks: tuple[int, ...]  # bytes each device needs at its peak


@dataclass(frozen=True)
class Placement:
    """The devices a worker uses and, when it spans several, the device of each module."""

    devices: tuple[torch.device, ...]
    device_map: dict[str, int] | None = None

    @property
    def primary(self) -> torch.device:
        """The device inputs enter on (the embeddings')."""
        return self.devices[0]

    def modules(self, storage: Callable[[torch.device], torch.device] = lambda d: d) -> torch.device | dict[str, str]:
        """Where ``load_model`` puts a model laid out like the working one: the one device, or a
        device map (module → device), each device taken through ``storage`` (where a memory tier
        keeps that device's tensors)."""
        if self.device_map is None:
            return storage(self.primary)
        return {name: str(storage(self.devices[index])) for name, index in self.device_map.items()}


def model_units(model: torch.nn.Module, itemsize: int, merged: Collection[str]) -> list[Unit]:
    """The units of ``model`` (on the meta device is enough) in model order; ``merged`` names the
    parameters merges write."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    owner: dict[int, str] = {}  # a parameter's id → the unit it is counted in
    units: list[Unit] = []

    def unit(name: str, params: list[tuple[str, torch.nn.Parameter]]) -> Unit:
        shared = [owner[id(p)] for _, p in params if id(p) in owner]
        own = [(n, p) for n, p in params if id(p) not in owner]
        for _, p in own:
            owner[id(p)] = name
        sizes = {n: p.numel() * itemsize for n, p in own}
        return Unit(
            name=name,
            size=sum(sizes.values()),
            merged=sum(s for n, s in sizes.items() if n in merged),
            largest=max(sizes.values(), default=0),
            tied_to=shared[0] if shared and not own else None,
        )

    def visit(prefix: str, module: torch.nn.Module) -> None:
        children = list(module.named_children())
        if type(module).__name__ in no_split or not children:
            params = [(f"{prefix}{n}", p) for n, p in module.named_parameters(remove_duplicate=False)]
            units.append(unit(prefix.rstrip("."), params))
            return
        for name, p in module.named_parameters(recurse=False):
            units.append(unit(f"{prefix}{name}", [(f"{prefix}{name}", p)]))
        for name, child in children:
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return units


def plan_shards(units: Sequence[Unit], cost: ShardCost, capacities: Sequence[int | None]) -> ShardPlan | None:
    """The contiguous split of ``units`` over ``len(capacities)`` devices whose largest peak is
    smallest with every device within its capacity (None: unbounded); None when none fits."""
    placed = [u for u in units if u.tied_to is None]
    bound = cost.need(sum(u.size for u in placed), sum(u.merged for u in placed), max(u.largest for u in placed))
    caps = [bound if c is None else min(c, bound) for c in capacities]
    if _fill(placed, cost, caps) is None:
        return None
    low, high = 0, bound  # the smallest feasible peak lies in (low, high]
    while high - low > 1:
        middle = (low + high) // 2
        if _fill(placed, cost, [min(c, middle) for c in caps]) is None:
            low = middle
        else:
            high = middle
    where = _fill(placed, cost, [min(c, high) for c in caps])
    assert where is not None
    device_map: dict[str, int] = {}
    totals = [[0, 0, 0] for _ in capacities]
    for u in units:
        index = device_map[u.tied_to] if u.tied_to is not None else where[u.name]
        device_map[u.name] = index
        size, merged, largest = totals[index]
        totals[index] = [size + u.size, merged + u.merged, max(largest, u.largest)]
    return ShardPlan(device_map, tuple(cost.need(*t) for t in totals))


def _fill(units: Sequence[Unit], cost: ShardCost, limits: Sequence[int]) -> dict[str, int] | None:
    """Each unit's device when devices are filled in order, each up to its limit (None: they do
    not fit). A unit that fits on no device from the current one on fails the fill."""
    where: dict[str, int] = {}
    device, size, merged, largest = 0, 0, 0, 0
    for u in units:
        while True:
            if device == len(limits):
                return None
            grown = (size + u.size, merged + u.merged, max(largest, u.largest))
            if cost.need(*grown) <= limits[device]:
                break
            device, size, merged, largest = device + 1, 0, 0, 0  # no room left here: the next device
        size, merged, largest = grown
        where[u.name] = device
    return where
