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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_NUMBERED = re.compile(r"^(?:(.*?)\.)?(\d+)(?:\.|$)")  # the first numbered segment and what precedes it


def stack_position(tensor_name: str) -> tuple[str, int] | None:
    """The stack a tensor's block belongs to and the block's index (``("model.layers", 7)``)."""
    match = _NUMBERED.match(tensor_name)
    return (match.group(1) or "", int(match.group(2))) if match else None


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
        stacks = list(dict.fromkeys(pos[0] for pos in map(stack_position, tensor_names) if pos is not None))
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
