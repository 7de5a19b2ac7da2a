"""A small MLP classifier for sklearn's 8×8 digits, as a Hugging Face model.

It is the expert of the embedded demo and of the M2N2 reproduction (the paper's "MNIST" runs use
sklearn's digits with a 64 → hidden → 10 MLP). Making it a ``PreTrainedModel`` means the demo goes
through exactly the path users' models take: ``save_pretrained`` / ``from_pretrained`` with
safetensors, loading by path, export of the best merge.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel


class DigitsMLPConfig(PretrainedConfig):
    model_type = "evomerge_digits_mlp"

    def __init__(self, n_features: int = 64, hidden_sizes: tuple[int, ...] | list[int] = (64,), n_classes: int = 10, **kwargs):
        self.n_features = n_features
        self.hidden_sizes = list(hidden_sizes)
        self.n_classes = n_classes
        super().__init__(**kwargs)


class DigitsMLP(PreTrainedModel):
    """``layers.{i}`` are the linear layers, so per-layer merge spaces find them by index."""

    config_class = DigitsMLPConfig
    base_model_prefix = "digits_mlp"

    def __init__(self, config: DigitsMLPConfig):
        super().__init__(config)
        sizes = [config.n_features, *config.hidden_sizes, config.n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def register() -> None:
    """Make ``AutoModel.from_pretrained`` know the architecture (idempotent)."""
    try:
        AutoConfig.register(DigitsMLPConfig.model_type, DigitsMLPConfig)
        AutoModel.register(DigitsMLPConfig, DigitsMLP)
    except ValueError:  # already registered
        pass
