"""Loading user functions named ``"package.module:function"`` (fitness plugins, answer extractors).

A module is found where Python finds installed ones, and in the directory evomerge runs in: a
plugin kept there (``./my_pkg/mod.py``, for ``my_pkg.mod:fn``) loads the same in ``evomerge validate``, on the
inline executor and on Ray, whose workers have the driver's directory (or the job's
``--working-dir``) on their path. Installed modules are looked for first, so one of the same name
wins over a file in the directory.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any, Callable

from evomerge.errors import PluginError, first_line


def load_function(reference: str, what: str) -> Callable[..., Any]:
    """The callable ``reference`` names; any import-time failure is the user's to fix, in one line."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{what} '{reference}': expected 'package.module:function'")
    try:
        module = _import(module_name)
    except Exception as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.partition(".")[0]:
            hint = (f" (it is neither installed nor in {os.getcwd()}, the directory evomerge runs in:"
                    f" install it, or run evomerge from the directory that holds {exc.name})")
        raise PluginError(f"{what} '{reference}': cannot import {module_name}: {first_line(exc)}{hint}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PluginError(f"{what} '{reference}': {module_name} has no function '{attr}'")
    return fn


def _import(module_name: str) -> ModuleType:
    """The module, found among installed ones first, else in the current directory (added to
    ``sys.path`` for good then: the plugin may import its neighbours when it runs)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != module_name.partition(".")[0] or cwd in sys.path:
            raise  # a dependency of the plugin is missing, or the directory was searched already
        sys.path.append(cwd)
        try:
            return importlib.import_module(module_name)
        except BaseException:
            sys.path.remove(cwd)
            raise
