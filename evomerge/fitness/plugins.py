"""Loading user functions named ``"package.module:function"`` (fitness plugins, answer extractors)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from evomerge.errors import PluginError


def load_function(reference: str, what: str) -> Callable[..., Any]:
    """The callable ``reference`` names; any import-time failure is the user's to fix, in one line."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{what} '{reference}': expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(f"{what} '{reference}': cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PluginError(f"{what} '{reference}': {module_name} has no function '{attr}'")
    return fn
