"""Fitness data: where examples come from.

Built-in sources need no download: ``sklearn:digits`` is bundled with scikit-learn (split as the
M2N2 code does: the first 80 % train, the last 20 % test, no shuffle). Local ``.npz`` files with
arrays ``inputs`` and ``labels`` serve any classifier.

Local ``.jsonl`` and ``.csv`` files hold text rows for language models. Each row is rendered into
``{"prompt": ..., "target": ..., "choices": [...], "label": int}`` by the data config's
templates, so one file format serves every text fitness function. A file has no splits of its own:
``split`` is ignored unless the rows carry a ``"split"`` field, in which case only the rows whose
``split`` equals it are kept (so one file can hold train and test rows).

``hf:NAME`` or ``hf:NAME:CONFIG`` loads a Hugging Face ``datasets`` dataset (a hub name such as
``hf:openai/gsm8k:main``, or a local dataset directory) and renders its rows the same way; there
``split`` is the dataset's split, e.g. ``train[:1319]``. The ``datasets`` package is optional.

Data that cannot score a candidate is refused when read, naming the file: no examples left after
``split``, ``classes`` and ``limit``, or NaN/inf among numeric inputs and labels.
:func:`read_examples` does it without torch, so ``evomerge validate`` and the run's plan catch it
before any model loads; workers take the same examples as tensors from :func:`load_examples`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from string import Formatter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from evomerge.errors import ConfigError, first_line

if TYPE_CHECKING:
    import torch

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


TEXT_SUFFIXES = (".jsonl", ".csv")
DATA_SCHEMES = ("sklearn:", "hf:")
"""Sources that name a bundled or hub dataset rather than a file: never resolved as paths."""


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) pairs; row numbers count data rows, not the CSV header or blank lines."""
    try:
        return _parse_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:  # a directory, no permission, not UTF-8 text
        raise ConfigError(f"{path}: cannot read it as UTF-8 {path.suffix.lstrip('.').upper()} text: {first_line(exc)}") from None


def _parse_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(enumerate(csv.DictReader(f), start=1))
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            number = len(rows) + 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: row {number} is not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}: row {number} is not a JSON object")
            rows.append((number, row))
    return rows


def _hf_rows(source: str, split: str) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a ``datasets`` split, numbered from 1 like file rows."""
    name, subset = source.removeprefix("hf:"), None
    if ":" in name and not Path(name).exists():
        name, subset = name.rsplit(":", 1)
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"fitness data '{source}' needs the datasets package: pip install 'evomerge[datasets]'") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # unknown name, split or config; no network; a broken local directory
        raise ConfigError(f"fitness data '{source}': cannot load split '{split}': {first_line(exc)}") from None
    return list(enumerate((dict(row) for row in loaded), start=1))


def _field(path: Path, number: int, row: dict[str, Any], name: str) -> Any:
    if name not in row:
        raise ConfigError(f"{path}: row {number} has no field '{name}'")
    return row[name]


def _render(path: Path, number: int, row: dict[str, Any], template: str) -> str:
    """``str.format`` over the row; an unknown field names the file, the row and the field. A
    malformed template (an unclosed brace, parsed here too) or one that indexes a value without
    items (``{answer[0]}`` over a number) is the user's to fix, so it is a ``ConfigError`` too."""
    try:
        for _, name, _, _ in Formatter().parse(template):
            if name is not None:
                _field(path, number, row, re.split(r"[.\[]", name, maxsplit=1)[0])
        return template.format(**row)
    except (IndexError, KeyError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: row {number}: template {template!r} cannot be filled: {exc}") from None


def _choices(path: Path, number: int, value: Any, name: str) -> list[str]:
    """A list of strings; CSV cells hold it as a JSON list."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: row {number}: field '{name}' must be a non-empty list of choices")
    return [str(c) for c in value]


def _text_examples(
    path: Path,
    rows: list[tuple[int, dict[str, Any]]],
    split: str | None,
    limit: int | None,
    template: str | None,
    target: str | None,
    choices: str | None,
    label: str | None,
) -> list[dict[str, Any]]:
    """Render rows into prompt/target/choices/label dicts.

    Unset fields default to the row's own ``prompt`` (required), ``target``, ``choices`` and
    ``label`` fields (each taken when present); set fields are required in every row. ``target``
    is a field name, or a template when it contains ``{``. A row's ``task`` field is kept: the
    evaluations record a mean per task.
    """
    if split is not None and any("split" in row for _, row in rows):
        rows = [(n, row) for n, row in rows if row.get("split") == split]
        if not rows:
            raise ConfigError(f"{path}: no rows have split '{split}'")
    if limit is not None:
        rows = rows[:limit]
    examples = []
    for number, row in rows:
        example: dict[str, Any] = {
            "prompt": _render(path, number, row, template) if template else str(_field(path, number, row, "prompt"))
        }
        if target is not None and "{" in target:
            example["target"] = _render(path, number, row, target)
        elif target is not None or "target" in row:
            example["target"] = str(_field(path, number, row, target or "target"))
        if choices is not None or "choices" in row:
            name = choices or "choices"
            example["choices"] = _choices(path, number, _field(path, number, row, name), name)
        if label is not None or "label" in row:
            name = label or "label"
            value = _field(path, number, row, name)
            try:
                example["label"] = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: row {number}: field '{name}' must be an integer index, not {value!r}") from None
            if "choices" in example and not 0 <= example["label"] < len(example["choices"]):
                raise ConfigError(
                    f"{path}: row {number}: label {example['label']} is outside its {len(example['choices'])} choices"
                )
        if "task" in row:  # several benchmarks in one file: the report compares per task
            example["task"] = str(row["task"])
        examples.append(example)
    return examples


def load_examples(
    source: str,
    split: str = "train",
    classes: Sequence[int] | None = None,
    limit: int | None = None,
    base_dir: Path | None = None,
    *,
    template: str | None = None,
    target: str | None = None,
    choices: str | None = None,
    label: str | None = None,
) -> dict[str, "torch.Tensor"] | list[dict[str, Any]]:
    """Examples as ``{"inputs": float32 [N, F], "labels": int64 [N]}`` (digits, .npz), or for
    .jsonl/.csv files and ``hf:`` datasets a list of ``{"prompt", "target"?, "choices"?, "label"?}`` dicts."""
    examples = read_examples(
        source, split, classes, limit, base_dir, template=template, target=target, choices=choices, label=label
    )
    if isinstance(examples, list):
        return examples
    import torch

    return {
        "inputs": torch.as_tensor(examples["inputs"], dtype=torch.float32),
        "labels": torch.as_tensor(examples["labels"], dtype=torch.long),
    }


def read_examples(
    source: str,
    split: str = "train",
    classes: Sequence[int] | None = None,
    limit: int | None = None,
    base_dir: Path | None = None,
    *,
    template: str | None = None,
    target: str | None = None,
    choices: str | None = None,
    label: str | None = None,
) -> dict[str, np.ndarray] | list[dict[str, Any]]:
    """The examples :func:`load_examples` returns, with numeric arrays as numpy (no torch), checked
    to hold at least one example and only finite numbers."""
    text_options = {"template": template, "target": target, "choices": choices, "label": label}
    if source.startswith("hf:"):
        if classes is not None:
            raise ConfigError(f"fitness data '{source}': 'classes' applies to .npz and sklearn data only")
        return _some(source, _text_examples(Path(source), _hf_rows(source, split), None, limit, **text_options))
    if source == "sklearn:digits":
        x, y = _digits(split)
    else:
        path = Path(source).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.suffix not in (".npz", *TEXT_SUFFIXES):
            raise ConfigError(f"fitness data '{source}': expected 'sklearn:digits', 'hf:NAME[:CONFIG]', or a .npz, .jsonl or .csv file")
        if not path.exists():
            raise ConfigError(f"fitness data file not found: {path}")
        if path.suffix in TEXT_SUFFIXES:
            if classes is not None:
                raise ConfigError(f"fitness data '{source}': 'classes' applies to .npz and sklearn data only")
            return _some(str(path), _text_examples(path, _read_rows(path), split, limit, **text_options))
        x, y = _npz_arrays(path)
    used = [name for name, value in text_options.items() if value is not None]
    if used:
        raise ConfigError(f"fitness data '{source}': {', '.join(used)} apply to .jsonl and .csv text data only")
    if classes is not None:
        keep = np.isin(y, np.asarray(classes))
        x, y = x[keep], y[keep]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    _some(source, x)
    for name, values in (("inputs", x), ("labels", y)):
        bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
        if len(bad):
            raise ConfigError(
                f"fitness data '{source}': '{name}' holds NaN or inf ({len(bad)} examples, the first at index {bad[0]})"
            )
    return {"inputs": x, "labels": y}


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``inputs`` and ``labels`` of a .npz file, numeric and one label per input."""
    try:
        with np.load(path) as arrays:
            if "inputs" not in arrays or "labels" not in arrays:
                raise ConfigError(f"{path}: a .npz fitness file needs arrays 'inputs' and 'labels'")
            x, y = arrays["inputs"], arrays["labels"]
    except (OSError, ValueError, EOFError) as exc:  # not a zip of arrays; pickled objects refused
        raise ConfigError(f"{path}: not a readable .npz file of arrays 'inputs' and 'labels': {first_line(exc)}") from None
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise ConfigError(f"{path}: 'inputs' and 'labels' must be numeric arrays, not {x.dtype} and {y.dtype}")
    if x.ndim == 0 or y.shape != (len(x),):
        raise ConfigError(f"{path}: 'labels' must hold one label per row of 'inputs', got shapes {y.shape} and {x.shape}")
    # Class ids index the model's outputs: 1.5 would be cut to 1 and -1 would match no class, each
    # scoring as a silent miss.
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(np.isfinite(y) & ((y < 0) | (y != np.floor(y))))
    if len(bad):
        raise ConfigError(
            f"{path}: 'labels' must be class ids (whole numbers from 0), got {y[bad[0]]} at index {bad[0]}"
            f" ({len(bad)} such labels)"
        )
    return x, y


def _some(source: str, examples: Any) -> Any:
    """``examples`` when there is at least one: a fitness over none cannot rank candidates."""
    if len(examples) == 0:
        raise ConfigError(f"fitness data '{source}' holds no examples (after its split, classes and limit)")
    return examples
