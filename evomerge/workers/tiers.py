"""Memory tiers: where a white-box worker keeps the experts while its working model stays on the device.

DESIGN.md §4. Three tiers, fastest first:

- ``device``: every expert's stack (and the base) resident on the working model's device;
- ``host``: the same stacks in host memory (pinned when the device is a GPU), copied to the device
  one tensor at a time, just before the kernel reads it;
- ``mmap``: nothing resident; each tensor of each expert is read from its safetensors file (through
  safetensors' memory map: the page cache, not the worker's own memory) when a merge reaches it.

A tier hands the materializer one parameter tensor of every expert at a time as a
:class:`ResidentTensor` on the working device (``with tier.tensor(name, scratch) as resident``),
or a block of its rows (``rows=(start, end)``; the materializer asks streaming tiers for blocks
when the method is elementwise). Streaming tiers fill reusable ``scratch`` buffers, so a worker's
peak is the working model, the tier's own holdings and a few tensor- or block-sized buffers. Every
tier hands the kernels the same numbers, so a merge gives identical results in each.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch

from evomerge.errors import ModelMismatchError
from evomerge.merge.method import LORA_FACTORS, MergeMethod
from evomerge.merge.resident import ResidentTensor, Scratch, TensorSummaries

if TYPE_CHECKING:
    from evomerge.plan import RunPlan

Rows = tuple[int, int] | None
"""A block ``[start, end)`` of a tensor's first dimension, or None for the whole tensor."""

TIERS = ("device", "host", "mmap")
"""Tier names, fastest first: the memory check takes the first that fits (``models.residency: auto``)."""


class HeldTier:
    """The experts' stacks held in memory, on ``storage`` (the device tier) or in host memory."""

    name = "device"
    maps_files = False
    streams = False  # whether each merge copies the experts in (then worth doing in blocks of rows)

    def __init__(self, tensors: Mapping[str, ResidentTensor], device: torch.device) -> None:
        self.tensors = dict(tensors)
        self.device = device  # the working model's

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
    def tensor(self, name: str, scratch: Scratch, rows: Rows = None) -> Iterator[ResidentTensor]:
        """Tensor ``name`` of every expert (or a block of its ``rows``), on the working device, for
        the duration of the scope."""
        held = self.tensors[name]
        if rows is None:
            yield held
        else:  # a block has summaries of its own: the tensor's describe the whole tensor
            lo, hi = rows
            yield ResidentTensor(name, held.stack[:, lo:hi], None if held.reference is None else held.reference[lo:hi])

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """Keep a per-tensor input computed at load time (an expert's Fisher) in this tier."""
        storage, pin = self.storage(self.device)
        held = tensor.to(storage)
        return held.pin_memory() if pin else held

    def stream(self, held: torch.Tensor, purpose: str, scratch: Scratch) -> torch.Tensor:
        """A held tensor as the kernel reads it, on the working device."""
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

    def stream(self, held: torch.Tensor, purpose: str, scratch: Scratch) -> torch.Tensor:
        buffer = scratch.get(purpose, tuple(held.shape), held.dtype, self.device)
        # From pinned memory the copy is asynchronous; the kernel that reads it follows on the same stream.
        buffer.copy_(held, non_blocking=held.is_pinned())
        return buffer

    @contextmanager
    def tensor(self, name: str, scratch: Scratch, rows: Rows = None) -> Iterator[ResidentTensor]:
        with super().tensor(name, scratch, rows) as held:
            stack = self.stream(held.stack, "tier_stack", scratch)
            reference = None if held.reference is None else self.stream(held.reference, "tier_reference", scratch)
            yield ResidentTensor(name=name, stack=stack, reference=reference, summaries=held.summaries)


class MappedTier:
    """Nothing resident: each merge reads every tensor of every expert (and the base) from its
    safetensors files into device buffers, converted to the working dtype; with a base the task
    vectors ``expert − base`` are formed there, as the held tiers form them at load time."""

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
        from safetensors import safe_open

        first = next(iter(targets.values()))
        self.device, self.dtype = first.device, first.dtype
        self.shapes = {name: tuple(t.shape) for name, t in targets.items()}
        self._summaries = {name: TensorSummaries() for name in targets}

        def files_of(label: str, files: Sequence[Path]) -> dict[str, object]:
            """Tensor name -> the open file holding it (open for the worker's life: each file is mapped once)."""
            where: dict[str, object] = {}
            for file in files:
                handle = safe_open(str(file), framework="pt", device="cpu")
                where.update((key, handle) for key in handle.keys())
            for name, shape in self.shapes.items():
                if name not in where:
                    raise ModelMismatchError(
                        f"{label} stores no tensor named {name} (its checkpoint's names differ from the"
                        f" loaded model's), so it cannot be memory-mapped; use models.residency host"
                    )
                stored = tuple(where[name].get_slice(name).get_shape())  # type: ignore[attr-defined]
                if stored != shape:
                    raise ModelMismatchError(f"{label} has {name} of shape {stored} but the working model has {shape}")
            return where

        self._experts = [files_of(label, files) for label, files in experts]
        self._base = None if base is None else files_of(*base)

    @property
    def n_models(self) -> int:
        return len(self._experts)

    @property
    def has_base(self) -> bool:
        return self._base is not None

    @staticmethod
    def _read(where: Mapping[str, object], name: str, rows: Rows, out: torch.Tensor) -> None:
        if rows is None:
            out.copy_(where[name].get_tensor(name))  # type: ignore[attr-defined]
        else:  # only the block's bytes are read
            out.copy_(where[name].get_slice(name)[rows[0] : rows[1]])  # type: ignore[attr-defined]

    @contextmanager
    def tensor(self, name: str, scratch: Scratch, rows: Rows = None) -> Iterator[ResidentTensor]:
        shape = self.shapes[name] if rows is None else (rows[1] - rows[0], *self.shapes[name][1:])
        stack = scratch.get("tier_stack", (self.n_models, *shape), self.dtype, self.device)
        reference = None
        if self._base is not None:
            reference = scratch.get("tier_reference", shape, self.dtype, self.device)
            self._read(self._base, name, rows, reference)
        for row, where in enumerate(self._experts):
            self._read(where, name, rows, stack[row])
            if reference is not None:
                stack[row].sub_(reference)
        summaries = self._summaries[name] if rows is None else TensorSummaries()
        yield ResidentTensor(name=name, stack=stack, reference=reference, summaries=summaries)

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        raise ValueError("the mmap tier holds nothing computed at load time (refused at plan time)")

    def stream(self, held: torch.Tensor, purpose: str, scratch: Scratch) -> torch.Tensor:
        raise ValueError("the mmap tier holds nothing computed at load time (refused at plan time)")


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
    adapters = [e.path for e in config.models.experts if is_adapter(config.model_ref(e.path))]
    if adapters:
        refused.setdefault("mmap", f"expert '{adapters[0]}' is a LoRA adapter merged into the base at load time; only full checkpoints map")
    return refused
