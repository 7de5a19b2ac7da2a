"""Loading experts and bases by local path or hub id, the way users' models are stored.

Everything goes through transformers' ``from_pretrained`` (safetensors), so a directory written by
``save_pretrained`` — ours or anyone's — loads the same way. Failures become one-line
``ModelLoadError``s naming the reference.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from evomerge.errors import ConfigError, ModelLoadError, first_line
from evomerge.models.model_files import check_safetensors, refuse_non_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def quiet_transformers() -> None:
    """No per-file progress bars or info logs from transformers inside a search."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def register_builtin_architectures() -> None:
    from evomerge.models.zoo import digits_mlp

    digits_mlp.register()


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU. An explicit device this process cannot use is
    refused here, naming ``models.device``, instead of failing at the first tensor moved to it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = (
                "no CUDA device is visible here (a Ray worker sees GPUs only with workers.gpus_per_worker > 0)"
                if torch.backends.cuda.is_built()
                else "the torch installed here is built without CUDA"
            )
            raise ConfigError(f"models.device is '{device}' but {why}; use 'auto' or 'cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"models.device is '{device}' but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"models.device is '{device}' but MPS is not available here; use 'auto' or 'cpu'")
    return resolved


def resolve_devices(device: str, count: int) -> tuple[torch.device, ...]:
    """The devices a worker uses: ``models.device`` alone, or for a worker spanning ``count``
    devices the first ``count`` CUDA devices it sees (a Ray worker sees the GPUs it was given as
    cuda:0 onwards). The config allows ``count`` > 1 only with models.device cuda or auto."""
    if count == 1:
        return (resolve_device(device),)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < count:
        raise ConfigError(
            f"models.devices is {count} but {visible} CUDA device(s) are visible here;"
            " lower models.devices, or run where each worker sees that many GPUs"
        )
    return tuple(torch.device("cuda", i) for i in range(count))


def _auto_class(config):
    """The Auto class that builds a checkpoint with its head: a causal LM, else an image-text model
    (LLaVA and Qwen2-VL have no causal-LM entry, and the bare ``AutoModel`` would drop their
    ``lm_head``), else the bare model (classifiers of the zoo)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModel


def load_config(ref: str):
    from transformers import AutoConfig

    path = Path(ref)
    if (path.is_absolute() or ref.startswith(".")) and not path.exists():
        # transformers would take it for a malformed hub id ("Repo id must be in the form ..."):
        # a run's models moved since it started, or a mistyped ``serve --model``.
        raise ModelLoadError(f"model directory not found: {ref}")
    refuse_non_model_dir(ref)
    register_builtin_architectures()
    quiet_transformers()
    try:
        return AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model config of '{ref}': {first_line(exc)}") from None


def load_model(ref: str, device: torch.device | Mapping[str, str], dtype: torch.dtype):
    """The model at ``ref`` in eval mode, without gradients, on ``device`` or sharded by a device
    map (module name → device, see ``evomerge.models.sharding``): transformers loads each module
    onto its device and, over several devices, moves activations between them in forward passes."""
    from safetensors import SafetensorError

    config = load_config(ref)
    sharded = not isinstance(device, torch.device)
    try:
        # Mismatched shapes are loaded as fresh tensors and reported, so that the message below
        # names the tensor; transformers' own error points at a report logged above it.
        model, info = _auto_class(config).from_pretrained(
            ref, dtype=dtype, device_map=dict(device) if sharded else None, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except SafetensorError as exc:
        raise unreadable_weights(ref, exc) from None
    except (pickle.UnpicklingError, EOFError) as exc:  # torch.load of a corrupt or empty pytorch_model.bin
        raise ModelLoadError(f"cannot load the model '{ref}': its .bin weights are truncated or corrupt ({type(exc).__name__})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the model '{ref}': {first_line(exc)}") from None
    refuse_incomplete(ref, info)
    refuse_non_finite(f"the model '{ref}'", model.named_parameters())
    if not sharded:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def refuse_incomplete(ref: str, info: Mapping[str, object]) -> None:
    """Refuse a checkpoint whose tensors do not fill the model its config.json describes.

    transformers initialises a missing or mismatched tensor at random and only logs it (a log
    quieted inside a search): an expert with a shard or a tensor lost would merge as noise.
    """
    mismatched = sorted(info["mismatched_keys"])  # type: ignore[call-overload]
    if mismatched:
        name, stored, expected = mismatched[0]
        raise ModelLoadError(
            f"'{ref}' stores {name} with shape {tuple(stored)} but its config.json makes it {tuple(expected)}:"
            " its weights and config.json describe different models"
        )
    missing = sorted(info["missing_keys"])  # type: ignore[call-overload]
    if missing:
        more = f" and {len(missing) - 1} more tensor(s)" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"'{ref}' stores no {missing[0]}{more} that its config.json calls for: its weights are incomplete"
            " (a shard or a tensor lost when it was copied or saved?)"
        )


FINITE_CHECK_ELEMENTS = 1 << 20
"""Elements checked at a time, so the check's boolean buffer (1 MiB) stays small beside a large
tensor: the memory-mapped tier runs it over the mapped files within its few-buffer budget."""


def refuse_non_finite(where: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor.

    A non-finite weight is a corrupt checkpoint (a diverged training run, a bad conversion), not
    something a search can use: every merge that includes it is non-finite too, and a classifier
    scores such a merge without complaint, so the search would rank noise.
    """
    for name, tensor in tensors:
        if tensor.is_meta or not tensor.is_floating_point():
            continue
        if not all(bool(torch.isfinite(block).all()) for block in tensor.detach().reshape(-1).split(FINITE_CHECK_ELEMENTS)):
            raise ModelLoadError(f"{where} holds NaN or infinite values in {name}: the checkpoint is corrupt; retrain or re-export it")


def unreadable_weights(ref: str, exc: Exception) -> ModelLoadError:
    """A safetensors error as one line naming the file: safetensors' own message ("incomplete
    metadata", "header too small") names none, and a model may be sharded over many files. Each
    local file's header is read again (cheap) to find the broken one."""
    path = Path(ref)
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        try:
            check_safetensors(file)
        except ModelLoadError as broken:
            return broken
    return ModelLoadError(f"cannot read the weights of '{ref}': {first_line(exc)}")


def load_tokenizer(ref: str):
    """The tokenizer saved beside a model, or ``None`` for models without one (classifiers)."""
    if os.path.isdir(ref) and not any((Path(ref) / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        if os.path.isdir(ref):
            raise ModelLoadError(f"cannot load the tokenizer in '{ref}': {first_line(exc)}") from None
        return None


def parameter_names(ref: str) -> list[str]:
    """Parameter names in model order, from the config alone (no weights are read)."""
    return list(parameter_shapes(ref))


def parameter_shapes(ref: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes in model order, from the config alone (no weights are read)."""
    return {name: tuple(p.shape) for name, p in meta_model(ref).named_parameters()}


def meta_model(ref: str):
    """The model ``ref``'s config describes, without storage (no weights are read): its parameter
    names, shapes and module tree."""
    config = load_config(ref)
    with torch.device("meta"):
        return _auto_class(config).from_config(config)


def loaded_names(ref: str, stored: Sequence[str], converted: bool = False) -> dict[str, str | None]:
    """What ``from_pretrained`` makes of each stored tensor name: the parameter (or buffer) it is
    renamed to, or None where transformers converts the tensor (fuses, splits or reshapes it) —
    with ``converted``, the parameter its conversion writes (Mixtral's stored
    ``experts.0.w1.weight`` is part of ``mlp.experts.gate_up_proj``).

    Transformers 5 renames checkpoint keys on load by the model's conversion mapping: Gemma 3
    stores ``language_model.model.layers.0.…``, which loads as ``model.language_model.layers.0.…``.
    The renaming is the one ``from_pretrained`` applies, so it holds for whatever layout the
    checkpoint has (the hub's, or the one ``save_pretrained`` writes). Before transformers 5 names
    load as they are stored.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {key: key for key in stored}
    model = meta_model(ref)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    prefix = model.base_model_prefix
    names: dict[str, str | None] = {}
    for key in stored:
        renamed, conversion = rename_source_key(key, renamings, converters, prefix, state)
        if renamed not in state and key in state:  # as from_pretrained: a key it should not have renamed
            renamed, conversion = rename_source_key(key, [], [], prefix, state)
        names[key] = None if conversion is not None and not converted else renamed
    return names
