"""evomerge: search for the best way to merge fine-tuned models.

The pure layers (``merge``, ``space``, ``strategies``, ``fitness``) import nothing heavier than
torch and numpy; Ray, HTTP and SQLite stay in the executor, workers and store.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``evomerge.load_run`` on first use: pandas loads then, so ``import evomerge`` stays fast."""
    if name == "load_run":
        from evomerge.analysis import load_run

        return load_run
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")


__all__ = ["__version__", "load_run"]
