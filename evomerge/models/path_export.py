"""A data-flow path as a standard model: its layers stacked in order, its scales folded into weights.

A scale c_k on the hidden state entering position k multiplies the residual stream from there on,
so the stream after k is C_k = c_1 · … · c_k times that of a model without scales whose every
sublayer writes 1/C_k of its output. In a pre-norm transformer (Llama, Mistral, Qwen2/3, Phi-3,
StableLM; Phi and GPT-NeoX, whose attention and MLP read the stream in parallel; Mixtral and the
Qwen MoEs, whose router reads the normed stream too) each sublayer reads the stream through a norm,
which does not see the factor (exact up to the norm's epsilon), and writes it through its output
projection: dividing ``o_proj`` and ``down_proj`` (every expert's) by C_k folds the scales away,
and the final norm removes the last C. Gemma2/3 put a norm after each sublayer, so their output is
scaled by those norms' weights instead (a Gemma norm multiplies by 1 + w). OLMo 2 has no norm before
its sublayers (its MLP sees the factor inside a nonlinearity): no fold. An architecture with no
declaration here is refused when a scale differs from 1 — by the plan, before a search whose best
path could not be exported (:func:`unfoldable`); with all scales 1 any architecture stacks
exactly.
"""

from __future__ import annotations

import copy
from fnmatch import fnmatchcase
from typing import Callable

import torch
from torch import nn

from evomerge.errors import InsufficientMemoryError, UserError
from evomerge.space.paths import Path
from evomerge.workers.path_model import PathMaterializer, decoder_stack

Fold = Callable[[torch.Tensor, float], torch.Tensor]


def _divide(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    return tensor / factor


def _divide_gemma_norm(weight: torch.Tensor, factor: float) -> torch.Tensor:
    return (1.0 + weight.double()) / factor - 1.0


def _linear_out(*projections: str) -> dict[str, Fold]:
    """The output projections (weight and bias) that write a pre-norm layer's sublayers' output."""
    return {f"{name}.{part}": _divide for name in projections for part in ("weight", "bias")}


_LINEAR_OUT = _linear_out("self_attn.o_proj", "mlp.down_proj")
# transformers 5 holds a MoE layer's experts as one fused tensor (4.x: one module per expert,
# matched by the wildcard); a shared expert (Qwen2-MoE) writes beside them
_MOE_OUT = {
    **_LINEAR_OUT,
    "mlp.experts.down_proj": _divide,
    "mlp.experts.*.down_proj.weight": _divide,
    "block_sparse_moe.experts.*.w2.weight": _divide,
    **_linear_out("mlp.shared_expert.down_proj"),
}
_GEMMA_POST_NORMS = {"post_attention_layernorm.weight": _divide_gemma_norm, "post_feedforward_layernorm.weight": _divide_gemma_norm}

SCALE_FOLDS: dict[str, dict[str, Fold]] = {
    "llama": _LINEAR_OUT,
    "mistral": _LINEAR_OUT,
    "qwen2": _LINEAR_OUT,
    "qwen3": _LINEAR_OUT,
    "qwen2_vl_text": _LINEAR_OUT,
    "phi3": _LINEAR_OUT,
    "stablelm": _LINEAR_OUT,
    "phi": _linear_out("self_attn.dense", "mlp.fc2"),  # attention and MLP in parallel, one norm
    "gpt_neox": _linear_out("attention.dense", "mlp.dense_4h_to_h"),
    "mixtral": _MOE_OUT,
    "qwen2_moe": _MOE_OUT,
    "qwen3_moe": _MOE_OUT,
    "gemma2": _GEMMA_POST_NORMS,
    "gemma3_text": _GEMMA_POST_NORMS,
}
"""Per ``model_type``: the tensors of a layer (name within the layer) that write its output to the
residual stream, and how dividing that output by a factor changes each."""


class ScaleFoldError(UserError):
    """The path's scales cannot be folded exactly into this architecture's weights."""


def unfoldable(model_type: str) -> str | None:
    """Why a path's scales cannot be folded into a ``model_type`` model's weights, or None."""
    if model_type in SCALE_FOLDS:
        return None
    return f"scales cannot be folded exactly into a {model_type} model's weights (known: {', '.join(sorted(SCALE_FOLDS))})"


def stacked_model(paths: PathMaterializer, path: Path) -> nn.Module:
    """A fresh model of ``len(path)`` layers equal to the worker's path model, scales folded in."""
    working = paths.model
    config = paths.path_config(path)
    text = config.get_text_config()
    folds = SCALE_FOLDS.get(text.model_type)
    if folds is None and any(scale != 1.0 for scale in path.scales):
        raise ScaleFoldError(f"{unfoldable(text.model_type)}; search it with merge.dataflow.scaling: none to export it")
    prefix, cumulative = _layers_prefix(working), 1.0
    state = {name: tensor for name, tensor in working.state_dict().items() if not name.startswith(prefix)}
    check_stacking_memory(paths, path, state)
    for position, ((source, index), scale) in enumerate(zip(path.layers, path.scales)):
        cumulative *= scale
        for name, tensor in paths.layers[source][index].state_dict().items():
            fold = _fold_of(folds or {}, name)
            value = tensor if fold is None or cumulative == 1.0 else fold(tensor, cumulative).to(tensor.dtype)
            state[f"{prefix}{position}.{name}"] = value.clone()
    model = type(working)(config).to(device=working.device, dtype=working.dtype)
    model.load_state_dict(state, strict=True)
    model.generation_config = copy.deepcopy(working.generation_config)
    return model.eval()


def _fold_of(folds: dict[str, Fold], name: str) -> Fold | None:
    """How a layer's tensor ``name`` changes, by its name or a wildcard pattern; None: it does not."""
    if name in folds:
        return folds[name]
    return next((fold for pattern, fold in folds.items() if "*" in pattern and fnmatchcase(name, pattern)), None)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_stacking_memory(paths: PathMaterializer, path: Path, outside_layers: dict[str, torch.Tensor]) -> None:
    """Refuse a path too long for memory: the worker shares its layers, but the stacked model holds
    a copy of every position's layer (twice while the copies are loaded into it) and its own
    embeddings and head, beside the sources."""
    from evomerge.models.memory import GIB, available_bytes

    layers = sum(_nbytes(paths.layers[source][index].state_dict().values()) for source, index in path.layers)
    need = 2 * layers + _nbytes(outside_layers.values())
    have = available_bytes(paths.model.device)
    if have is not None and need > have:
        raise InsufficientMemoryError(
            f"the path has {len(path)} layers: stacking them into a model needs {need / GIB:.2f} GiB beside the sources,"
            f" but {have / GIB:.2f} GiB are free; export on a machine with more memory, or search shorter paths"
            " (merge.dataflow.max_layers)"
        )


def _layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder layers (``model.layers.``)."""
    layers = decoder_stack(model).layers
    return next(f"{name}." for name, module in model.named_modules() if module is layers)
