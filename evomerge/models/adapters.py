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

from evomerge.errors import ModelLoadError, ModelMismatchError, first_line
from evomerge.models.loading import refuse_non_finite, unreadable_weights
from evomerge.models.model_files import ADAPTER_CONFIG, adapter_weight_files

WORKING_ADAPTER = "default"
_SAVED_FACTOR = re.compile(r"\.lora_(?:embedding_)?[AB](?:\.weight)?$")
_FACTOR_A = re.compile(r"\.lora_(?:embedding_)?A(?:\.weight)?$")  # (r, in); a B factor is (out, r)
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
    where = f"{Path(ref) / ADAPTER_CONFIG}" if Path(ref).is_dir() else f"the adapter config of '{ref}'"
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r < 1:
        raise ModelLoadError(f"{where}: r must be a positive integer (the adapter's rank), got {config.r!r}")
    if isinstance(config.lora_alpha, bool) or not isinstance(config.lora_alpha, (int, float)) or not math.isfinite(config.lora_alpha):
        raise ModelLoadError(f"{where}: lora_alpha must be a number, got {config.lora_alpha!r}")
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

    lora_config(ref)
    # the names peft loads the factors under: it renames them as the base renames its checkpoints
    stored = adapter_weights(ref, key_mapping=getattr(model, "_checkpoint_conversion_mapping", None))
    try:
        with warnings.catch_warnings():  # peft asks transformers 5 for a deprecated property on every load
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            # peft's own warning on factors it found no tensor for is replaced by the error below
            warnings.filterwarnings("ignore", message="Found missing adapter keys", category=UserWarning)
            peft_model = PeftModel.from_pretrained(model, ref, adapter_name=WORKING_ADAPTER, autocast_adapter_dtype=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot attach the adapter '{ref}' to the base: {first_line(exc)}") from None
    _check_factors_fit(ref, stored, lora_parameters(peft_model))
    peft_model.requires_grad_(False)
    peft_model.eval()
    return peft_model


def adapter_weights(ref: str, device: str = "cpu", key_mapping: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor an adapter stores, loaded as peft loads them, refused if any is NaN or infinite
    (every merge including it would be too)."""
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    if Path(ref).is_dir():
        adapter_weight_files(Path(ref))
    try:
        weights = load_peft_weights(ref, device=device, key_mapping=key_mapping or None)
    except SafetensorError as exc:
        raise unreadable_weights(ref, exc) from None
    except Exception as exc:
        raise ModelLoadError(f"cannot load the adapter weights of '{ref}': {first_line(exc)}") from None
    refuse_non_finite(f"the adapter '{ref}'", weights.items())
    return weights


def _check_factors_fit(ref: str, stored: dict[str, torch.Tensor], attached: dict[str, torch.Tensor]) -> None:
    """Every LoRA factor the adapter's config creates has a stored tensor, and every stored factor
    a module: peft only warns of the first (the factor keeps its initial value, so the adapter is
    silently not applied there) and ignores the second (a checkpoint saved under other names)."""
    factors = {key for key in stored if _SAVED_FACTOR.search(key)}
    missing = sorted(set(attached) - factors)
    unused = sorted(factors - set(attached))
    if missing:
        raise ModelMismatchError(
            f"the adapter '{ref}' stores no {missing[0]}{_more(missing)}, which its {ADAPTER_CONFIG} (target_modules)"
            " creates on the base: its weights are incomplete or saved for another model"
        )
    if unused:
        raise ModelMismatchError(
            f"the adapter '{ref}' stores {unused[0]}{_more(unused)}, which matches no LoRA module its"
            f" {ADAPTER_CONFIG} creates on the base: it was saved for another model or under other names"
        )


def _more(names: list[str]) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


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
    weights = adapter_weights(ref, str(device))
    others = sorted(k for k in weights if not _SAVED_FACTOR.search(k))
    if others:
        raise ModelLoadError(f"'{ref}' holds tensors that are not LoRA factors (e.g. {others[0]}); they cannot be composed")
    config = lora_config(ref)
    for key, tensor in weights.items():  # its scaling below is alpha / r: r must be the factors' rank
        rank = tensor.shape[0] if _FACTOR_A.search(key) else tensor.shape[1]
        if rank != config.r:
            raise ModelMismatchError(
                f"the adapter '{ref}' stores {key} of rank {rank} but its {ADAPTER_CONFIG} says r: {config.r}"
            )
    ratio = lora_scaling(config) / scaling
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
