"""Fitness data: where examples come from.

Built-in sources need no download: ``sklearn:digits`` is bundled with scikit-learn (split as the
M2N2 code does: the first 80 % train, the last 20 % test, no shuffle). Local ``.npz`` files with
arrays ``inputs`` and ``labels`` serve any classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evomerge.errors import ConfigError

DIGITS_TRAIN_FRACTION = 0.8


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    cut = int(DIGITS_TRAIN_FRACTION * len(x))
    if split == "train":
        return x[:cut] / 16.0, y[:cut]
    if split == "test":
        return x[cut:] / 16.0, y[cut:]
    raise ConfigError(f"sklearn:digits has splits 'train' and 'test', not '{split}'")


def load_examples(
    source: str,
    split: str = "train",
    classes: Sequence[int] | None = None,
    limit: int | None = None,
    base_dir: Path | None = None,
) -> dict[str, torch.Tensor]:
    """Examples as ``{"inputs": float32 [N, F], "labels": int64 [N]}``."""
    if source == "sklearn:digits":
        x, y = _digits(split)
    else:
        path = Path(source).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.suffix != ".npz":
            raise ConfigError(f"fitness data '{source}': expected 'sklearn:digits' or a .npz file")
        if not path.exists():
            raise ConfigError(f"fitness data file not found: {path}")
        with np.load(path) as arrays:
            if "inputs" not in arrays or "labels" not in arrays:
                raise ConfigError(f"{path}: a .npz fitness file needs arrays 'inputs' and 'labels'")
            x, y = arrays["inputs"], arrays["labels"]
    if classes is not None:
        keep = np.isin(y, np.asarray(classes))
        x, y = x[keep], y[keep]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return {"inputs": torch.as_tensor(x, dtype=torch.float32), "labels": torch.as_tensor(y, dtype=torch.long)}
