"""Towers of a multimodal model, read from its parameter names alone.

An image-text model holds several stacks of numbered blocks — Gemma 3's language model
(``model.language_model.layers.N``) and its SigLIP vision encoder
(``model.vision_tower.encoder.layers.N``) — beside parts without blocks, such as the projector
between them. Block N of one stack has nothing to do with block N of another, so layer groups are
formed per stack, and each part (a *tower*) can be searched or kept as it is (``merge.frozen``).

A tower is named by the first segment after the prefix all stacks share (``language_model``,
``vision_tower``, ``multi_modal_projector``); a stack by its prefix less that shared one
(``language_model.layers``). A model with a single stack (a Llama) has no towers: its layer groups
are numbered as they always were. Nothing here knows an architecture: T5's ``encoder.block`` and
``decoder.block`` are towers the same way.

Not every number in a name counts blocks: an ``nn.Sequential`` of plain modules numbers them too
(Qwen2-VL's projector ``visual.merger.mlp.0.weight`` and ``mlp.2.weight``, a GELU between them).
Numbers that skip an index (the parameterless activation) and number bare tensors rather than
modules with parts of their own are such a sequence, not a stack (:func:`stack_positions`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_NUMBERED = re.compile(r"^(?:(.*?)\.)?(\d+)(?:\.|$)")  # the first numbered segment and what precedes it


def stack_positions(tensor_names: Sequence[str]) -> list[tuple[str, int] | None]:
    """Per tensor of one model, the stack its block belongs to and the block's index
    (``("model.layers", 7)``: its first numbered segment and what precedes it), or None outside
    every stack. A prefix whose numbers skip an index and whose numbered entries hold bare tensors
    (``mlp.0.weight``, ``mlp.2.weight``) is a sequence of plain modules, not a stack of blocks; a
    stack of blocks numbers every block, or numbers modules with parts (a LoRA adapter on some
    layers only: ``layers.2.self_attn.q_proj.lora_A.weight``)."""
    positions: list[tuple[str, int] | None] = []
    indices: dict[str, set[int]] = {}
    nested: set[str] = set()  # stacks whose numbered entries have parts (``layers.0.mlp.weight``)
    for name in tensor_names:
        match = _NUMBERED.match(name)
        if match is None:
            positions.append(None)
            continue
        stack, index = match.group(1) or "", int(match.group(2))
        positions.append((stack, index))
        indices.setdefault(stack, set()).add(index)
        if "." in name[match.end():]:
            nested.add(stack)
    plain = {s for s, found in indices.items() if s not in nested and len(found) != max(found) - min(found) + 1}
    return [None if p is None or p[0] in plain else p for p in positions]


@dataclass(frozen=True)
class Towers:
    """Which tower each tensor belongs to, for a model with several stacks of numbered blocks."""

    shared_prefix: str
    """The dotted prefix every stack starts with (``model.``; empty when they share none)."""
    stacks: tuple[str, ...]
    """The stacks' prefixes in model order (``model.language_model.layers``)."""

    @classmethod
    def of(cls, tensor_names: Sequence[str]) -> "Towers | None":
        """The towers of a model with these parameter names, or None when it has one stack."""
        stacks = list(dict.fromkeys(pos[0] for pos in stack_positions(tensor_names) if pos is not None))
        if len(stacks) < 2:
            return None
        split = [s.split(".") for s in stacks]
        shared: list[str] = []
        for segments in zip(*split):
            if len(set(segments)) > 1:
                break
            shared.append(segments[0])
        return cls("".join(f"{s}." for s in shared), tuple(stacks))

    def tower(self, tensor_name: str) -> str:
        """The first segment after the shared prefix (``vision_tower``); for a tensor outside it
        (an untied ``lm_head`` beside ``model.``), its own first segment."""
        rest = tensor_name.removeprefix(self.shared_prefix) if tensor_name.startswith(self.shared_prefix) else tensor_name
        return rest.split(".", 1)[0]

    def stack_name(self, stack: str) -> str:
        return stack.removeprefix(self.shared_prefix)

    def names(self, tensor_names: Sequence[str]) -> list[str]:
        """Every tower, in model order."""
        return list(dict.fromkeys(self.tower(n) for n in tensor_names))
