"""What a checkpoint says about itself, read without loading its weights.

The safetensors headers name every stored tensor and its dtype, and ``config.json`` the dtype the
model was saved in: enough to pick the run's dtype (``models.dtype: auto``), to write a mergekit
YAML whose filters match the tensors mergekit reads (the checkpoint's names, which need not be the
loaded module's parameter names: ``stored_parameters`` pairs them), and to name a hub id in a model card instead of a local path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from evomerge.config import RunConfig
from evomerge.errors import ConfigError, ModelLoadError, first_line
from evomerge.models.adapters import is_adapter
from evomerge.models.loading import load_config, loaded_names, unreadable_weights
from evomerge.models.model_files import INDEX, SINGLE_FILE, safetensors_files

MERGE_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a run may hold its models in (models.dtype without auto)."""
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name: a recorded name without an org may be a folder
# A model downloaded by huggingface_hub lives in <cache>/models--<org>--<name>/snapshots/<commit>.
_HUB_CACHE = re.compile(r"(?:^|/)models--([\w.-]+?)--([\w.-]+)/snapshots/[0-9a-f]+(?:/|$)")


def local_dir(ref: str) -> Path:
    """The directory holding ``ref``'s files: itself, or its snapshot in the hub cache (where the
    run's workers already downloaded the weights)."""
    path = Path(ref)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=["*.json", SINGLE_FILE, "model-*.safetensors"]))
    except Exception as exc:  # offline and not cached, or not on the hub
        raise ModelLoadError(f"cannot read the checkpoint files of '{ref}': {first_line(exc)}") from None


def weight_files(ref: str) -> list[Path]:
    """The safetensors files transformers loads for ``ref``: the shards its index names, or the
    single file (a repository may hold others, such as Mistral's ``consolidated.safetensors``)."""
    files = safetensors_files(local_dir(ref))
    if not files:  # pickled weights only
        raise ModelLoadError(f"'{ref}' holds no {SINGLE_FILE} (nor a sharded {INDEX})")
    return files


def tensor_dtypes(ref: str) -> dict[str, str]:
    """Every tensor the checkpoint stores, in file order, with its safetensors dtype (``F32``…)."""
    from safetensors import SafetensorError, safe_open

    dtypes: dict[str, str] = {}
    for file in weight_files(ref):
        try:
            with safe_open(str(file), framework="pt") as f:
                dtypes.update((key, f.get_slice(key).get_dtype()) for key in f.keys())
        except (SafetensorError, OSError) as exc:
            raise unreadable_weights(str(file), exc) from None
    return dtypes


def stored_parameters(ref: str) -> dict[str, str | None]:
    """Every tensor the checkpoint stores, in file order, with the parameter it loads into (None
    where transformers converts rather than renames it): what a mergekit filter, which matches
    stored names, must say to reach a merged parameter."""
    return loaded_names(ref, list(tensor_dtypes(ref)))


def stored_dtype(ref: str) -> str:
    """The dtype a full model was saved in: its config's ``dtype`` (``torch_dtype`` before
    transformers 5), else that of its floating-point tensors; float32 when neither says."""
    config = load_config(ref)
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if recorded is not None and str(recorded) != "auto":  # "auto" records nothing
        return str(recorded).removeprefix("torch.")
    floating = {_SAFETENSORS_DTYPES[d] for d in tensor_dtypes(ref).values() if d in _SAFETENSORS_DTYPES}
    return widest(floating) if floating else "float32"


def widest(dtypes: set[str]) -> str:
    """The one dtype that holds every value of ``dtypes`` exactly (bfloat16 and float16 only
    meet in float32)."""
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return "float32"


def run_dtype(config: RunConfig) -> str:
    """The dtype the run holds its models in: ``models.dtype``, or with ``auto`` the dtype the
    base and the full-model experts are stored in — the widest of them when they differ, so no
    checkpoint loses precision. A LoRA adapter expert follows the base it is merged onto."""
    if config.models.dtype != "auto":
        return config.models.dtype
    refs = [config.model_ref(config.models.base)] if config.models.base else []
    refs += [ref for ref in (config.expert_model(e) for e in config.models.experts) if not is_adapter(ref)]
    stored = {ref: stored_dtype(ref) for ref in refs}
    for ref, dtype in stored.items():
        if dtype not in MERGE_DTYPES:
            raise ConfigError(
                f"models.dtype is auto but '{ref}' is stored in {dtype}; set models.dtype to one of {', '.join(MERGE_DTYPES)}"
            )
    return widest(set(stored.values()))


def hub_id(ref: str) -> str | None:
    """The hub id a model is known by: ``ref`` itself, the snapshot it is a copy of in the hub
    cache, or the ``_name_or_path`` its config.json records (older transformers wrote it); None
    when none is known, so that no local path is ever published as a model id."""
    if not Path(ref).exists():  # RunConfig.model_ref keeps only hub ids unresolved
        return None if Path(ref).is_absolute() else ref
    cached = _HUB_CACHE.search(Path(ref).resolve().as_posix() + "/")
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    try:
        recorded = json.loads((Path(ref) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        return None
    if isinstance(recorded, str) and _HUB_ID.match(recorded) and not Path(recorded).exists():
        return recorded
    return None
