"""Tiny models the suites build in memory in a second: nothing is downloaded or trained.

Merge kernels only see tensors, so their suite works on random state dicts laid out like a Llama
(or like a PEFT adapter). Fitness functions need a real forward pass, so theirs gets a randomly
initialised digits MLP and a character-level Llama from ``evomerge.models``.
"""

from __future__ import annotations

from typing import Any

import torch

LAYOUT: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (12, 6),
    "model.layers.0.self_attn.q_proj.weight": (6, 6),
    "model.layers.0.input_layernorm.weight": (6,),
    "model.layers.1.self_attn.q_proj.weight": (6, 6),
    "model.layers.1.input_layernorm.weight": (6,),
    "model.layers.2.mlp.up_proj.weight": (9, 6),
    "model.layers.3.mlp.up_proj.weight": (9, 6),
    "model.norm.weight": (6,),
    "lm_head.weight": (12, 6),
}
"""A model with an embedding before the layers and a norm and head after them, like a Llama."""

LORA_LAYOUT: dict[str, tuple[int, ...]] = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 10),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (10, 4),
    "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": (4, 10),
    "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": (10, 4),
}
"""A PEFT adapter (the only kind of model lora_compose accepts)."""


def random_state(layout: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A state dict of standard-normal tensors (times ``scale``), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * scale for name, shape in layout.items()}


def digits_classifier(seed: int = 0) -> torch.nn.Module:
    """An untrained 64 → 16 → 10 digits MLP in eval mode (the demo's architecture, smaller)."""
    from evomerge.models.zoo.digits_mlp import DigitsMLP, DigitsMLPConfig

    torch.manual_seed(seed)
    return DigitsMLP(DigitsMLPConfig(hidden_sizes=[16])).eval()


def char_llama(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """An untrained two-layer Llama and its character tokenizer, in eval mode."""
    from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama

    tokenizer = build_tokenizer()
    return tiny_llama(tokenizer, hidden=32, heads=2, seed=seed).eval(), tokenizer
