"""Apply a decoded genome to a resident model: the thin layer between merge kernels and a worker's model.

The materializer reads, per parameter tensor, the experts' weights in resident form (see
``resident.py``) from its memory tier (``tiers.py``: on the device, in host memory, or mapped
from the checkpoints) and writes each candidate straight into the working model's parameters — no
temporary model, no disk. Expert state dicts are consumed one at a time, so building a held tier
needs the memory of the result plus one expert, never all experts twice.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, TypeVar

import numpy as np
import torch

from evomerge.errors import ModelMismatchError
from evomerge.merge import MergeMethod
from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor, Scratch, combine_
from evomerge.space.merge_space import Recipe
from evomerge.space.seed_recipes import PiecewiseRecipe, check_split_grid, split_grid_edges
from evomerge.workers.tiers import DeviceTier, ExpertTier, HeldTier

T = TypeVar("T")

GRAM_ROW_CHUNK = 1 << 20

DEFAULT_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 24}
"""Elements per kernel step: L3-sized on CPUs (measured on 2 EPYC cores: 2^20 beats 2^17–2^19 for
every kernel, as per-op dispatch costs about as much as 2^16 elements of work); large on GPUs,
where launches dominate."""


STREAM_BUFFER_SHARE = 0.05
"""For an elementwise method, the share of the working model's size that the blocks a streaming
tier reads for one merge step may take together (one block per expert, and the base's)."""


def block_elements(chunk: int, itemsize: int, budget: int) -> int:
    """Elements per streamed block: as many whole chunks as fit in ``budget`` bytes (at least one).

    A block then splits the kernels' chunked passes exactly where the whole tensor's do, so every
    op sees the same elements at the same positions and the merge is bit for bit the same (half
    types round differently in vectorised loops and their scalar tails: any other split point
    could change a result).
    """
    return chunk * max(1, budget // (chunk * itemsize))


def stream_budget(model_bytes: int, n_models: int, has_base: bool, share: float = STREAM_BUFFER_SHARE) -> int:
    """Bytes one streamed block may take, so that one per model read stays within ``share`` of the model."""
    return int(model_bytes * share) // (n_models + has_base)


def default_chunk(device_type: str, total: int, n_models: int) -> int:
    """Elements per kernel step for ``total`` parameters and ``n_models`` experts on a device type.

    Kernels keep a few chunk-sized work buffers per expert; on small models the chunk is capped so
    that they stay well under the size of one model (the memory budget's one spare).
    """
    cap = 1 << max(12, (total // (4 * (n_models + 2))).bit_length() - 1)
    return min(DEFAULT_CHUNK.get(device_type, 1 << 20), cap)


def _check_same_layout(
    label: str, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], ref_label: str
) -> None:
    missing = [n for n in reference if n not in state]
    extra = [n for n in state if n not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"has extra {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
        raise ModelMismatchError(f"{label} does not match {ref_label}: it {' and '.join(parts)}")
    for name, ref in reference.items():
        shape = tuple(state[name].shape)
        if shape != tuple(ref.shape):
            vocabulary = "embed" in name or "lm_head" in name or "wte" in name
            hint = " (the vocabularies differ: save each model's tokenizer beside it to align them)" if vocabulary else ""
            raise ModelMismatchError(
                f"{label} has {name} of shape {shape} but {ref_label} has {tuple(ref.shape)}{hint}"
            )


class Materializer:
    """Experts in a memory tier for one model layout, writing merges into ``targets`` in place."""

    def __init__(
        self,
        targets: Mapping[str, torch.Tensor],
        tier: ExpertTier,
        chunk: int | None = None,
        stream_share: float = STREAM_BUFFER_SHARE,
    ) -> None:
        """``stream_share``: see :data:`STREAM_BUFFER_SHARE` (a test passes a small one to force blocks)."""
        self.targets = dict(targets)
        self.tier = tier
        names = list(self.targets)
        self.offsets: dict[str, int] = {}
        total = 0
        for name in names:
            self.offsets[name] = total
            total += self.targets[name].numel()
        self.total = total
        first = next(iter(self.targets.values()))
        self.chunk = default_chunk(first.device.type, total, tier.n_models) if chunk is None else chunk
        self.itemsize = first.element_size()
        self.block_budget = stream_budget(total * self.itemsize, tier.n_models, tier.has_base, stream_share)
        self._flat_gram: torch.Tensor | None = None
        self._scratch = Scratch()
        self.fishers: dict[str, torch.Tensor] | None = None
        """Per tensor, the experts' diagonal Fisher information ``[n_models, *shape]`` (see
        :meth:`set_fishers`); only Fisher merging reads it."""

    @classmethod
    def from_state_dicts(
        cls,
        targets: Mapping[str, torch.Tensor],
        experts: Iterable[tuple[str, Mapping[str, torch.Tensor]]],
        n_models: int,
        base: Mapping[str, torch.Tensor] | None = None,
        chunk: int | None = None,
        tier: type[HeldTier] = DeviceTier,
        stream_share: float = STREAM_BUFFER_SHARE,
    ) -> "Materializer":
        """Build a held ``tier`` from ``(label, state_dict)`` pairs consumed one at a time.

        With a ``base``, rows hold task vectors ``expert − base``; without, the raw weights.
        ``targets`` are the working model's parameters; the resident copies take their dtype, and
        their device (each target's own, when the working model spans several) or host memory as
        the tier says.
        """
        placed = {name: tier.storage(t.device) for name, t in targets.items()}
        if base is not None:
            _check_same_layout("the base model", base, targets, "the working model")
        stacks = {
            name: torch.empty((n_models, *t.shape), dtype=t.dtype, device=placed[name][0], pin_memory=placed[name][1])
            for name, t in targets.items()
        }
        references = (
            {name: _held(base[name].to(dtype=t.dtype), *placed[name]) for name, t in targets.items()}
            if base is not None
            else None
        )
        count = 0
        for label, state in experts:  # not enumerate(): it holds the last item while the next one loads
            if count >= n_models:
                raise ValueError(f"more than the announced {n_models} experts")
            _check_same_layout(label, state, targets, "the base model" if base is not None else "the first expert")
            for name, dest in stacks.items():
                dest[count].copy_(state[name])
                if references is not None:
                    dest[count].sub_(references[name])
            count += 1
            # gone before the next expert loads: loading holds one expert at a time, as the memory
            # estimate counts (on a GPU each expert is built on the device)
            del state
        if count != n_models:
            raise ValueError(f"expected {n_models} experts, got {count}")
        tensors = {
            name: ResidentTensor(name=name, stack=stack, reference=None if references is None else references[name])
            for name, stack in stacks.items()
        }
        devices = {name: t.device for name, t in targets.items()}
        return cls(targets, tier(tensors, devices), chunk=chunk, stream_share=stream_share)

    @property
    def tensors(self) -> dict[str, ResidentTensor]:
        """The resident tensors a held tier keeps (vocabulary fills and gradients write or read
        them whole); a mapped tier keeps none."""
        if not isinstance(self.tier, HeldTier):
            raise ValueError(f"the {self.tier.name} memory tier holds no resident tensors")
        return self.tier.tensors

    @property
    def n_models(self) -> int:
        return self.tier.n_models

    @property
    def has_base(self) -> bool:
        return self.tier.has_base

    def check_method(self, method: MergeMethod) -> None:
        if method.needs_base and not self.has_base:
            raise ValueError(f"merge method '{method.name}' needs a base model")
        if self.n_models < method.min_models or (method.max_models and self.n_models > method.max_models):
            bound = (
                f"exactly {method.min_models}"
                if method.min_models == method.max_models
                else f"at least {method.min_models}"
            )
            raise ValueError(f"merge method '{method.name}' takes {bound} experts, got {self.n_models}")
        if method.needs_fisher and self.fishers is None:
            raise ValueError(f"merge method '{method.name}' needs the experts' Fisher information (set_fishers)")

    def set_fishers(self, fishers: Mapping[str, torch.Tensor], floor: float) -> None:
        """Keep the experts' diagonal Fishers, stacked per tensor, in the working dtype and the memory
        tier, floored at ``floor`` (computed once per worker, e.g. by ``evomerge.workers.fisher_estimate``)."""
        self.fishers = {
            name: self.tier.hold(name, fishers[name].to(dtype=t.dtype).clamp_min(floor))
            for name, t in self.targets.items()
        }

    def flat_gram(self) -> torch.Tensor:
        """Gram matrix of the experts over the whole flattened parameter set (computed once)."""
        if self._flat_gram is None:
            self._flat_gram = sum(self._each_tensor(lambda t: t.gram(self._scratch)))  # type: ignore[assignment]
        return self._flat_gram  # type: ignore[return-value]

    @torch.no_grad()
    def apply_base(self) -> None:
        """Write the base itself (the reference the experts' task vectors are taken from) into every
        target tensor: the base scored alone, beside the experts."""
        if not self.has_base:
            raise ValueError("the experts were loaded without a base model")
        for name, out in self.targets.items():
            self._read(name, None, lambda resident: combine_(out, resident, [0.0] * self.n_models, self.chunk, ref_coef=1.0))

    def _each_tensor(self, summary) -> list:
        """``summary(resident)`` for every tensor in order, each read from the tier in its own scope."""
        return [self._read(name, None, summary) for name in self.targets]

    def _read(self, name: str, span: tuple[int, int] | None, use: Callable[[ResidentTensor], T]) -> T:
        """``use(resident)`` on tensor ``name`` (or the block ``span`` of it) as the tier hands it over.

        Nothing read outlives the call (a ``with … as resident`` in a loop would keep the last
        tensor bound while the next is read), so a streaming tier's buffer, when it grows for a
        larger tensor, is released before the larger one is allocated: the peak is one buffer of the
        largest size, as the memory estimate counts, not two.
        """
        with self.tier.tensor(name, self._scratch, span) as resident:
            return use(resident)

    def apply(self, decoded: Recipe | PiecewiseRecipe) -> None:
        """Write what a codec decoded into every target tensor: a merge recipe, or pieces."""
        if isinstance(decoded, PiecewiseRecipe):
            self._apply_pieces(decoded.edges, decoded.coefficients)
        else:
            self._apply_recipe(decoded)

    @torch.no_grad()
    def _apply_recipe(self, recipe: Recipe) -> None:
        """Write the merge described by ``recipe`` into every target tensor."""
        method = recipe.method
        self.check_method(method)
        flat_gram = self.flat_gram() if method.needs_flat_gram else None
        for index, (name, out) in enumerate(self.targets.items()):
            # on the CPU whatever the device: a CUDA generator draws other numbers from the same seed,
            # and a recipe (DARE's drop masks) must merge the same on a GPU worker and at export on a laptop
            generator = torch.Generator()
            generator.manual_seed((recipe.seed + 0x9E3779B97F4A7C15 * (index + 1)) % (1 << 63))
            ctx = TensorContext(
                name=name,
                offset=self.offsets[name],
                total=self.total,
                generator=generator,
                chunk=self.chunk,
                flat_gram=flat_gram,
                scratch=self._scratch,
            )
            if method.needs_fisher and self.fishers is not None:
                ctx.fisher = self.tier.stream(name, self.fishers[name], "tier_fisher", self._scratch)
            params = recipe.params_for(name)
            for span in self._blocks(name) if method.elementwise else [None]:
                block = out if span is None else out.view(-1)[span[0] : span[1]]
                at = ctx if span is None else dataclasses.replace(ctx, offset=ctx.offset + span[0])
                self._read(name, span, lambda resident: method.kernel(block, resident, params, recipe.options, at))

    def _blocks(self, name: str) -> list[tuple[int, int] | None]:
        """The blocks of elements a streaming tier reads tensor ``name`` in for an elementwise method."""
        numel = self.targets[name].numel()
        step = block_elements(self.chunk, self.itemsize, self.block_budget)
        if not self.tier.streams or step >= numel:
            return [None]
        return [(lo, min(lo + step, numel)) for lo in range(0, numel, step)]

    def block_edges(self, grid: str) -> np.ndarray:
        """Element offsets of the blocks of a split grid over the flattened parameters."""
        check_split_grid(grid, self.total)
        return split_grid_edges([tuple(t.shape) for t in self.targets.values()], grid)

    @torch.no_grad()
    def block_grams(self, grid: str) -> tuple[np.ndarray, np.ndarray]:
        """``(edges, grams)``: the experts' Gram matrix on every block of ``grid`` (float64).

        The experts' full weights count (base plus task vector when there is a base), since M2N2's
        seed recipes combine the models themselves. Computed once per run, on the worker's device.
        """
        edges = self.block_edges(grid)
        per_tensor = self._each_tensor(lambda tensor: self._row_grams(tensor, grid))
        return edges, np.concatenate([gram for grams in per_tensor for gram in grams])

    @staticmethod
    def _row_grams(tensor: ResidentTensor, grid: str) -> list[np.ndarray]:
        """The Gram matrices of one tensor's blocks of ``grid``, in order."""
        grams = []
        if grid == "elements":
            width = 1
        else:  # as block_edges: a matrix's rows, or a vector or scalar whole
            width = tensor.numel // tensor.shape[0] if len(tensor.shape) > 1 else tensor.numel
        n_rows = tensor.numel // width
        flat = tensor.flat_stack().view(tensor.n_models, n_rows, width)
        ref = tensor.flat_reference()
        ref_rows = None if ref is None else ref.view(n_rows, width)
        step = max(1, GRAM_ROW_CHUNK // width)
        for lo in range(0, n_rows, step):
            block = flat[:, lo : lo + step].to(torch.float64, copy=True)  # never alias the resident rows
            if ref_rows is not None:
                block += ref_rows[lo : lo + step]
            grams.append(torch.einsum("srw,trw->rst", block, block).cpu().numpy())
        return grams

    @torch.no_grad()
    def _apply_pieces(self, edges: np.ndarray, coefficients: np.ndarray) -> None:
        """Write ``Σ_s c[k, s] · expert_s`` on each piece ``[edges[k], edges[k+1])`` of the flat parameters.

        M2N2's seed recipes materialize this way: a linear merge whose weights change at the
        recipe's split points, one streaming pass per piece and tensor.
        """
        edges = np.asarray(edges, dtype=np.int64)
        coefficients = np.asarray(coefficients, dtype=np.float64)
        if edges[0] != 0 or edges[-1] != self.total or coefficients.shape != (len(edges) - 1, self.n_models):
            raise ValueError(
                f"pieces must cover the {self.total} parameters with {self.n_models} coefficients each"
            )
        for name, out in self.targets.items():
            start = self.offsets[name]
            for span in self._blocks(name):  # a linear combination: streamed in blocks
                lo_block, hi_block = (0, out.numel()) if span is None else span
                block = out if span is None else out.view(-1)[lo_block:hi_block]
                first = int(np.searchsorted(edges, start + lo_block, side="right")) - 1
                last = int(np.searchsorted(edges, start + hi_block, side="left"))

                def write(resident: ResidentTensor) -> None:  # called at once: the loop's values are current
                    for k in range(first, last):
                        lo = max(int(edges[k]) - start, lo_block) - lo_block
                        hi = min(int(edges[k + 1]) - start, hi_block) - lo_block
                        if lo < hi:
                            combine_(block, resident, coefficients[k].tolist(), self.chunk, segment=(lo, hi))

                self._read(name, span, write)


def _held(tensor: torch.Tensor, storage: torch.device, pin: bool) -> torch.Tensor:
    """A copy of ``tensor`` of its own on ``storage`` (pinned if asked)."""
    held = torch.empty(tensor.shape, dtype=tensor.dtype, device=storage, pin_memory=pin)
    return held.copy_(tensor)
