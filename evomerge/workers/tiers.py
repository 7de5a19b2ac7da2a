"""Memory tiers: where a white-box worker keeps the experts while its working model stays on the device.

DESIGN.md §4. Three tiers, fastest first:

- ``device``: every expert's stack (and the base) resident on the working model's device;
- ``host``: the same stacks in host memory (pinned when the device is a GPU), copied to the device
  one tensor at a time, just before the kernel reads it;
- ``mmap``: nothing resident; each tensor of each expert is read from its safetensors file, mapped
  into memory (the page cache, not the worker's own memory), when a merge reaches it.

A tier hands the materializer one parameter tensor of every expert at a time as a
:class:`ResidentTensor` on the working device (``with tier.tensor(name, scratch) as resident``),
or a block of its elements (``span=(start, end)`` of the flattened tensor; the materializer asks
streaming tiers for blocks when the method is elementwise). The working device is the target
tensor's own: a worker spanning several devices keeps (or streams) each expert tensor on the
device of the shard it merges into. Streaming tiers fill reusable
``scratch`` buffers, so a worker's peak is the working model, the tier's own holdings and a few
tensor- or block-sized buffers. Every tier hands the kernels the same numbers, so a merge gives
identical results in each.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch

from evomerge.errors import ModelLoadError, ModelMismatchError
from evomerge.merge.method import LORA_FACTORS, MergeMethod
from evomerge.merge.resident import ResidentTensor, Scratch, TensorSummaries
from evomerge.models.loading import refuse_non_finite
from evomerge.models.model_files import check_safetensors

if TYPE_CHECKING:
    from evomerge.plan import RunPlan

Span = tuple[int, int] | None
"""A block ``[start, end)`` of a flattened tensor's elements, or None for the whole tensor."""

TIERS = ("device", "host", "mmap")
"""Tier names, fastest first: the memory check takes the first that fits (``models.residency: auto``)."""


class HeldTier:
    """The experts' stacks held in memory, on ``storage`` (the device tier) or in host memory."""

    name = "device"
    maps_files = False
    streams = False  # whether each merge copies the experts in (then worth doing in blocks)

    def __init__(self, tensors: Mapping[str, ResidentTensor], devices: Mapping[str, torch.device]) -> None:
        """``devices``: the device of each of the working model's tensors (its shard's)."""
        self.tensors = dict(tensors)
        self.devices = dict(devices)

    @staticmethod
    def storage(device: torch.device) -> tuple[torch.device, bool]:
        """Where this tier holds the stacks for a working model on ``device``, and whether pinned."""
        return device, False

    @property
    def n_models(self) -> int:
        return next(iter(self.tensors.values())).n_models

    @property
    def has_base(self) -> bool:
        return next(iter(self.tensors.values())).reference is not None

    @contextmanager
    def tensor(self, name: str, scratch: Scratch, span: Span = None) -> Iterator[ResidentTensor]:
        """Tensor ``name`` of every expert (or the block ``span`` of its elements, flattened), on
        the working device, for the duration of the scope."""
        held = self.tensors[name]
        if span is None:
            yield held
        else:  # a block has summaries of its own: the tensor's describe the whole tensor
            lo, hi = span
            reference = held.flat_reference()
            yield ResidentTensor(name, held.flat_stack()[:, lo:hi], None if reference is None else reference[lo:hi])

    def hold(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Keep a per-tensor input of tensor ``name`` computed at load time (an expert's Fisher) in this tier."""
        storage, pin = self.storage(self.devices[name])
        held = tensor.to(storage)
        return held.pin_memory() if pin else held

    def stream(self, name: str, held: torch.Tensor, purpose: str, scratch: Scratch) -> torch.Tensor:
        """A held input of tensor ``name`` as the kernel reads it, on that tensor's device."""
        return held


class DeviceTier(HeldTier):
    """Everything resident on the working model's device: no copies per merge."""


class HostTier(HeldTier):
    """Stacks in host memory, copied tensor by tensor into device buffers reused across tensors."""

    name = "host"
    streams = True

    @staticmethod
    def storage(device: torch.device) -> tuple[torch.device, bool]:
        return torch.device("cpu"), device.type == "cuda"

    def stream(self, name: str, held: torch.Tensor, purpose: str, scratch: Scratch) -> torch.Tensor:
        buffer = scratch.get(purpose, tuple(held.shape), held.dtype, self.devices[name])
        # From pinned memory the copy is asynchronous; the kernel that reads it follows on the same stream.
        buffer.copy_(held, non_blocking=held.is_pinned())
        return buffer

    @contextmanager
    def tensor(self, name: str, scratch: Scratch, span: Span = None) -> Iterator[ResidentTensor]:
        with super().tensor(name, scratch, span) as held:
            stack = self.stream(name, held.stack, "tier_stack", scratch)
            reference = None if held.reference is None else self.stream(name, held.reference, "tier_reference", scratch)
            yield ResidentTensor(name=name, stack=stack, reference=reference, summaries=held.summaries)


class MappedTier:
    """Nothing resident: each merge reads every tensor of every expert (and the base) from its
    safetensors files into device buffers, converted to the working dtype; with a base the task
    vectors ``expert − base`` are formed there, as the held tiers form them at load time.

    Each file is mapped once, copy-on-write and never written, so its pages stay the page cache's;
    a tensor (or a block of its elements) is read straight from the mapping into the buffer.
    """

    name = "mmap"
    maps_files = True
    streams = True

    def __init__(
        self,
        targets: Mapping[str, torch.Tensor],
        experts: Sequence[tuple[str, Sequence[Path]]],
        base: tuple[str, Sequence[Path]] | None = None,
    ) -> None:
        """``experts`` and ``base`` are ``(label, safetensors files)``; ``targets`` the working
        model's parameters, whose names the files must store with the same shapes."""
        self.dtype = next(iter(targets.values())).dtype
        self.devices = {name: t.device for name, t in targets.items()}
        self.shapes = {name: tuple(t.shape) for name, t in targets.items()}
        self._summaries = {name: TensorSummaries() for name in targets}
        self._experts = [self._locate(label, files) for label, files in experts]
        self._base = None if base is None else self._locate(*base)

    def _locate(self, label: str, files: Sequence[Path]) -> dict[str, _Stored]:
        """Where each of the working model's tensors lies in ``label``'s files."""
        stored: dict[str, _Stored] = {}
        for file in files:
            stored.update(_stored_tensors(file))
        for name, shape in self.shapes.items():
            if name not in stored:
                raise ModelMismatchError(
                    f"{label} stores no tensor named {name} (its checkpoint's names differ from the"
                    f" loaded model's), so it cannot be memory-mapped; use models.residency host"
                )
            if stored[name].shape != shape:
                raise ModelMismatchError(f"{label} has {name} of shape {stored[name].shape} but the working model has {shape}")
        # One pass over the files, as the other tiers check what they load: a merge reads these
        # tensors from disk every time, and one non-finite element makes every merge non-finite.
        refuse_non_finite(label, ((name, stored[name].read(0, math.prod(shape))) for name, shape in self.shapes.items()))
        return stored

    @property
    def n_models(self) -> int:
        return len(self._experts)

    @property
    def has_base(self) -> bool:
        return self._base is not None

    @contextmanager
    def tensor(self, name: str, scratch: Scratch, span: Span = None) -> Iterator[ResidentTensor]:
        whole = span is None
        lo, hi = (0, math.prod(self.shapes[name])) if whole else span
        shape = self.shapes[name] if whole else (hi - lo,)
        device = self.devices[name]
        stack = scratch.get("tier_stack", (self.n_models, *shape), self.dtype, device)
        reference = None
        if self._base is not None:
            reference = scratch.get("tier_reference", shape, self.dtype, device)
            reference.view(-1).copy_(self._base[name].read(lo, hi))
        for row, stored in enumerate(self._experts):
            stack[row].view(-1).copy_(stored[name].read(lo, hi))
            if reference is not None:
                stack[row].sub_(reference)
        summaries = self._summaries[name] if whole else TensorSummaries()
        yield ResidentTensor(name=name, stack=stack, reference=reference, summaries=summaries)

    def hold(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        raise ValueError("the mmap tier holds nothing computed at load time (refused at plan time)")

    def stream(self, name: str, held: torch.Tensor, purpose: str, scratch: Scratch) -> torch.Tensor:
        raise ValueError("the mmap tier holds nothing computed at load time (refused at plan time)")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class _Stored:
    """One tensor in a mapped safetensors file: its bytes start at ``offset`` of ``mapping``."""

    mapping: mmap.mmap
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read(self, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor: a view of the mapped file, no copy."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return torch.frombuffer(self.mapping, dtype=self.dtype, count=end - start, offset=self.offset + start * itemsize)


def _stored_tensors(file: Path) -> dict[str, _Stored]:
    """Every floating-point tensor of a safetensors file (an 8-byte header length, a JSON header
    of names, dtypes, shapes and byte ranges, then the data), mapped once.

    safetensors reads the header first: it refuses what the other tiers' loader refuses (an
    unknown dtype, byte ranges that overlap, leave gaps or run past the file), so a file this
    tier maps is one whose ranges hold exactly the tensors the header describes.
    """
    check_safetensors(file)
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for torch, never written
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"'{file}' is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return {
        name: _Stored(mapping, 8 + length + int(info["data_offsets"][0]), _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
        for name, info in header.items()
        if name != "__metadata__" and info["dtype"] in _SAFETENSORS_DTYPES
    }


ExpertTier = HeldTier | MappedTier
TIER_CLASSES: dict[str, type[HeldTier] | type[MappedTier]] = {"device": DeviceTier, "host": HostTier, "mmap": MappedTier}


def method_refusals(method: MergeMethod) -> dict[str, str]:
    """The tiers a merge method cannot read its inputs from, each with the reason (from its declarations)."""
    if method.needs_fisher:
        return {"mmap": f"{method.name} keeps each expert's Fisher, estimated at load time (no file to map)"}
    if method.inputs == LORA_FACTORS:
        return {"mmap": f"{method.name} merges LoRA factors scaled at load time (no file to map)"}
    return {}


def refused_tiers(plan: "RunPlan") -> dict[str, str]:
    """The tiers this run cannot use, each with the reason: the method's, the populations' needs
    and the experts' kinds."""
    from evomerge.models.adapters import is_adapter

    config = plan.config
    refused: dict[str, str] = {}
    if plan.gradient_populations:
        why = "adamerging's entropy gradient differentiates through every expert at once, so they stay on the device"
        refused.update(host=why, mmap=why)
    for tier, why in method_refusals(plan.method).items():
        refused.setdefault(tier, why)
    if plan.dataflow:
        why = "a data-flow worker runs the sources' own layers, held on its device"
        refused.update(host=why, mmap=why)
    adapters = [e.source for e in config.models.experts if is_adapter(config.expert_model(e))]
    if adapters:
        refused.setdefault("mmap", f"expert '{adapters[0]}' is a LoRA adapter merged into the base at load time; only full checkpoints map")
    return refused
