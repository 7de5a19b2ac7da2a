"""What a local model or adapter directory must hold, checked from its files alone, without torch.

``evomerge validate`` runs these checks (it loads no torch), and so does ``run`` before it
creates its run directory: a checkpoint copied without its config, a shard, or its weights, or a
weights file cut short, is named at once instead of when the workers load it, perhaps hours into
a queue. Each safetensors header is read through safetensors itself (its NumPy reader needs no
torch), so it is refused exactly where loading it would fail. What only loading can tell (a
tensor of the wrong shape, a NaN) is checked there (``evomerge.models.loading``).
"""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.errors import ModelLoadError, first_line

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
BIN_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
"""Pickled weights transformers still loads (no header to check here)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
"""The weight files peft saves (and loads, safetensors first)."""


def refuse_non_model_dir(ref: str) -> None:
    """A local ``ref`` that is a file, or a directory without config.json, is not a model."""
    path = Path(ref)
    if path.is_file():
        raise ModelLoadError(f"'{ref}' is a file; a model is a directory written by save_pretrained (config.json and weights)")
    if path.is_dir() and not (path / CONFIG).is_file():
        raise ModelLoadError(f"'{ref}' holds no {CONFIG}: not a model directory written by save_pretrained")


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from a model directory: the shards its index
    names (each must exist), or the single file; none where it holds only pickled weights."""
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"'{folder / INDEX}' is not a readable safetensors index: {first_line(exc)}") from None
        for shard in shards:
            if not shard.is_file():
                raise ModelLoadError(f"'{folder / INDEX}' names the shard {shard.name}, which '{folder}' does not hold")
        return shards
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if any((folder / name).is_file() for name in BIN_FILES):
        return []
    raise ModelLoadError(f"'{folder}' holds no weights ({SINGLE_FILE}, a sharded {INDEX}, or {BIN_FILES[0]})")


def adapter_weight_files(folder: Path) -> list[Path]:
    """The weight files of a local adapter directory; refused when it holds none."""
    present = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not present:
        raise ModelLoadError(f"'{folder}' holds {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return present


def check_safetensors(file: Path) -> None:
    """Refuse a safetensors file whose header is cut short or corrupt (its length, JSON, dtypes,
    or byte ranges that overlap or run past the file), naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"'{file}' is not a readable safetensors file (truncated or corrupt?): {first_line(exc)}") from None


def check_model_dir(ref: str) -> None:
    """A local model or peft adapter directory holds a readable config and weights whose
    safetensors headers read."""
    path = Path(ref)
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        _json_object(path / ADAPTER_CONFIG)
        files = [file for file in adapter_weight_files(path) if file.suffix == ".safetensors"]
    else:
        refuse_non_model_dir(ref)
        if "model_type" not in _json_object(path / CONFIG):
            raise ModelLoadError(f"'{path / CONFIG}' names no model_type: not a config written by save_pretrained")
        files = safetensors_files(path)
    for file in files:
        check_safetensors(file)


def _json_object(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{file}' is not valid JSON: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"'{file}' is not valid JSON: expected an object of settings")
    return data
