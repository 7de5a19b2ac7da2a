"""Strategy checkpoints as plain data: JSON values and numpy arrays in one ``.npz`` blob.

A checkpoint must outlive the library versions that wrote it, and loading it must never run code.
So states hold only JSON values (dicts with string keys, lists, strings, numbers, booleans, None;
non-finite floats allowed) and numpy arrays. :func:`dumps` refuses anything else instead of
falling back to pickle, and :func:`loads` reads with ``allow_pickle=False``. What a library cannot
save as data (an Optuna study, a pycma ES) is rebuilt from what it was told, as Optuna rebuilds a
study from its storage. Tuples come back as lists.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

_ARRAY = "__array__"
_DOCUMENT = "__document__"


class NotPlainData(TypeError):
    """A state holds something that is neither a JSON value nor a numpy array."""


def dumps(state: Any) -> bytes:
    """``state`` as one compressed npz blob: a JSON document whose arrays point into the archive."""
    arrays: list[np.ndarray] = []

    def encode(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise NotPlainData(f"{where}: an array of Python objects is not plain data")
            arrays.append(np.ascontiguousarray(value))
            return {_ARRAY: len(arrays) - 1}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            out = {}
            for key, v in value.items():
                if not isinstance(key, str):
                    raise NotPlainData(f"{where}: key {key!r} is not a string")
                if key == _ARRAY:
                    raise NotPlainData(f"{where}: the key {_ARRAY!r} is reserved")
                out[key] = encode(v, f"{where}.{key}")
            return out
        raise NotPlainData(f"{where}: {type(value).__name__} is not plain data (JSON values and numpy arrays only)")

    document = json.dumps(encode(state, "state"), allow_nan=True, separators=(",", ":"))
    buffer = io.BytesIO()
    members = {f"a{i}": a for i, a in enumerate(arrays)}
    np.savez_compressed(buffer, **{_DOCUMENT: np.frombuffer(document.encode(), dtype=np.uint8)}, **members)
    return buffer.getvalue()


def loads(blob: bytes) -> Any:
    """The state :func:`dumps` wrote; ValueError for anything that is not such a blob (old pickles)."""
    try:
        archive = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"not a plain-data state ({err})") from None
    with archive:
        if _DOCUMENT not in archive.files:
            raise ValueError("not a plain-data state (no document)")
        document = json.loads(archive[_DOCUMENT].tobytes().decode())
        arrays = {name: archive[name] for name in archive.files if name != _DOCUMENT}

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if set(value) == {_ARRAY}:
                return arrays[f"a{value[_ARRAY]}"]
            return {k: decode(v) for k, v in value.items()}
        return value

    return decode(document)
