"""LoRA adapters (peft) as experts.

An expert may be a peft LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
of the run's base instead of a full model. Two ways to merge them:

* ``lora_compose`` merges the adapters' factors themselves: the working model is the base with one
  resident adapter whose ``lora_A``/``lora_B`` parameters each candidate is written into, so a
  candidate costs the size of an adapter, not of the model. Adapters whose scaling (``lora_alpha /
  r``) differs from the first one's get the ratio folded into their B factors once, at load.
* Every other method sees each adapter as the dense model ``base + scaling · B A`` (peft's
  ``merge_and_unload``), i.e. a task vector like a full fine-tune's.

Saved adapter keys carry no adapter name (``…q_proj.lora_A.weight``) while a loaded model's
parameters do (``…q_proj.lora_A.default.weight``); resident tensors are keyed by the saved names,
so a merged adapter exports with the same keys. peft only warns on missing or unexpected keys; here
every mismatch is an error naming the tensors.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

from evomerge.errors import ModelLoadError, first_line
from evomerge.models.loading import unreadable_weights

ADAPTER_CONFIG = "adapter_config.json"
WORKING_ADAPTER = "default"
_SAVED_FACTOR = re.compile(r"\.lora_(?:embedding_)?[AB](?:\.weight)?$")
_WORKING_FACTOR = re.compile(rf"\.(lora_(?:embedding_)?[AB])\.{WORKING_ADAPTER}(?=\.weight$|$)")


def is_adapter(ref: str) -> bool:
    """A local directory holding a peft adapter, or a hub id whose repository holds one."""
    path = Path(ref)
    if path.is_dir():
        return (path / ADAPTER_CONFIG).exists()
    if path.is_absolute():
        return False
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(ref)
    except Exception:  # no adapter config there (a full model), or the hub is out of reach
        return False
    return True


def lora_config(ref: str):
    """The adapter's ``LoraConfig``; other peft types and per-module ranks are refused."""
    from peft import LoraConfig, PeftConfig

    try:
        config = PeftConfig.from_pretrained(ref)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the adapter config of '{ref}': {first_line(exc)}") from None
    if not isinstance(config, LoraConfig):
        raise ModelLoadError(f"'{ref}' is a {type(config).__name__} adapter; evomerge merges LoRA adapters")
    if config.rank_pattern or config.alpha_pattern:
        raise ModelLoadError(f"'{ref}': adapters with per-module ranks or alphas (rank_pattern/alpha_pattern) are not supported")
    return config


def lora_scaling(config) -> float:
    """peft's multiplier of ``B A``: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA."""
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def saved_key(parameter_name: str) -> str:
    """``…lora_A.default.weight`` → ``…lora_A.weight``: the key the adapter file uses."""
    return _WORKING_FACTOR.sub(r".\1", parameter_name)


def attach_working_adapter(model: torch.nn.Module, ref: str):
    """The base wrapped in a peft model holding the adapter at ``ref``, frozen, in eval mode.

    Its LoRA parameters are the resident slots candidates are written into; the adapter stays
    unmerged so that every write is seen by the next forward pass.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        with warnings.catch_warnings():  # peft asks transformers 5 for a deprecated property on every load
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(model, ref, adapter_name=WORKING_ADAPTER, autocast_adapter_dtype=False)
    except SafetensorError as exc:
        raise unreadable_weights(ref, exc) from None
    except Exception as exc:
        raise ModelLoadError(f"cannot attach the adapter '{ref}' to the base: {first_line(exc)}") from None
    peft_model.requires_grad_(False)
    peft_model.eval()
    return peft_model


def lora_parameters(peft_model) -> dict[str, torch.Tensor]:
    """The working adapter's LoRA factors, keyed by their saved names, in model order."""
    return {
        saved_key(name): param.data
        for name, param in peft_model.named_parameters()
        if _WORKING_FACTOR.search(name)
    }


def adapter_factors(ref: str, device: torch.device, dtype: torch.dtype, scaling: float) -> dict[str, torch.Tensor]:
    """An adapter's LoRA factors, with its scaling relative to ``scaling`` folded into B.

    Only LoRA factors may be in the file: trained ``modules_to_save`` copies cannot be composed.
    """
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    try:
        weights = load_peft_weights(ref, device=str(device))
    except SafetensorError as exc:
        raise unreadable_weights(ref, exc) from None
    except Exception as exc:
        raise ModelLoadError(f"cannot load the adapter weights of '{ref}': {first_line(exc)}") from None
    others = sorted(k for k in weights if not _SAVED_FACTOR.search(k))
    if others:
        raise ModelLoadError(f"'{ref}' holds tensors that are not LoRA factors (e.g. {others[0]}); they cannot be composed")
    ratio = lora_scaling(lora_config(ref)) / scaling
    factors = {}
    for key, tensor in weights.items():
        tensor = tensor.to(dtype)
        factors[key] = tensor * ratio if ratio != 1.0 and ("lora_B" in key or "lora_embedding_B" in key) else tensor
    return factors


def merged_adapter_state(model: torch.nn.Module, ref: str) -> dict[str, torch.Tensor]:
    """``base + scaling · B A`` for every adapted module: the adapter as a dense expert.

    ``model`` is a fresh copy of the base; it is consumed (peft modifies it in place).
    """
    peft_model = attach_working_adapter(model, ref)
    merged = peft_model.merge_and_unload()
    return {name: param.data for name, param in merged.named_parameters()}
