"""Materializing a data-flow path: the working model's layer list re-pointed at resident layers.

No weight is copied. A candidate's path becomes a new ``ModuleList`` over the sources' own decoder
layers; a layer that appears at several positions is a shallow copy sharing its parameters, with
its own ``layer_idx`` so each position keeps its own slot in the KV cache. A scale other than 1 is
applied to the hidden state entering its layer by a thin wrapper. The working model is the head
source (its embeddings, final norm and head; ``merge.dataflow.head_source``), and its config is
its own copy whose ``num_hidden_layers`` (and ``layer_types``, for models that mix sliding and full
attention) follow the path, which is what transformers reads to run the layers and size the cache.
Switching candidates therefore costs a list of shallow copies, never a tensor.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from evomerge.errors import ModelMismatchError
from evomerge.space.paths import Path


class ScaledInput(nn.Module):
    """A decoder layer whose incoming hidden state is multiplied by ``scale`` (the paper's W)."""

    def __init__(self, layer: nn.Module, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.layer(hidden_states * self.scale, *args, **kwargs)


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module holding a causal LM's ``layers`` list (``model.model`` for Llama and kin)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise ModelMismatchError(f"a {type(model).__name__} has no decoder layer list a data-flow path can route through")
    return decoder


def _has_layer_index(module: nn.Module) -> bool:
    return any(hasattr(m, "layer_idx") for m in module.modules())


def at_position(layer: nn.Module, position: int) -> nn.Module:
    """``layer`` as the ``position``-th layer of a path: shallow copies (shared parameters) of the
    modules on the way to every ``layer_idx``, which is set to ``position``."""
    if not _has_layer_index(layer):
        return layer
    clone = copy.copy(layer)
    clone._modules = {name: None if child is None else at_position(child, position) for name, child in layer._modules.items()}
    if hasattr(clone, "layer_idx"):
        clone.layer_idx = position
    return clone


class PathMaterializer:
    """Holds every source's decoder layers and points the working model (the head source) at a path."""

    def __init__(
        self, model: nn.Module, layers: Sequence[Sequence[nn.Module]], layer_types: Sequence[Sequence[str] | None], head: int = 0
    ) -> None:
        self.model = model
        self.decoder = decoder_stack(model)
        self.layers = [list(source) for source in layers]
        self.layer_types = [None if t is None else list(t) for t in layer_types]
        self.head = head
        self.base_config = copy.deepcopy(model.config)
        self.path: Path | None = None

    @classmethod
    def from_models(cls, models: Sequence[nn.Module], head: int = 0) -> "PathMaterializer":
        """``models[head]`` becomes the working model itself (embeddings, final norm, head); of the
        others only their decoder layers are kept."""
        layers = [list(decoder_stack(m).layers) for m in models]
        types = [getattr(m.config.get_text_config(), "layer_types", None) for m in models]
        return cls(models[head], layers, types, head)

    def apply(self, path: Path) -> None:
        """Re-point the working model's layers at ``path`` (no weight is copied)."""
        stack = []
        for position, ((source, index), scale) in enumerate(zip(path.layers, path.scales)):
            layer = at_position(self.layers[source][index], position)
            stack.append(layer if scale == 1.0 else ScaledInput(layer, scale))
        config = self.path_config(path)
        self.decoder.layers = nn.ModuleList(stack)
        self.model.config = config
        self.decoder.config = config.get_text_config()
        self.path = path

    def path_config(self, path: Path):
        """The head source's config with the path's depth (and per-layer attention types)."""
        config = copy.deepcopy(self.base_config)
        text = config.get_text_config()
        text.num_hidden_layers = len(path)
        if self.layer_types[self.head] is not None:
            text.layer_types = [self.layer_type(source, index) for source, index in path.layers]
        return config

    def layer_type(self, source: int, index: int) -> str:
        """The attention type (``layer_types`` entry) of one source layer, wherever it runs."""
        types = self.layer_types[source]
        return "full_attention" if types is None else types[index]
