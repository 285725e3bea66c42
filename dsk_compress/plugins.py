"""Resolve ``"package.module:attr"`` strings that name the user's own factories (models, tasks)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from dsk_compress.errors import DskError, RecipeError


def load_target(target: str, field: str = "torch", error: type[DskError] = RecipeError) -> Any:
    """Import ``"package.module:attr"`` and return the attribute, which must be callable.

    When the module is not importable as is and the current directory is not on ``sys.path``, the
    current directory is added and the import retried, so a recipe run from a project's root finds
    that project's modules (``python -m`` does the same). Raises ``error`` with one line naming
    ``field`` when the string is malformed, the import fails or the attribute is not callable.
    """

    def fail(message: str, hint: str):
        return error(message, hint=hint) if issubclass(error, DskError) else error(f"{message} ({hint})")

    mod_name, sep, attr = str(target).partition(":")
    if not sep or not mod_name or not attr:
        raise fail(f"{field}: {target!r} is not 'package.module:factory'", hint="e.g. examples.digits.task:make_task")
    try:
        mod = _import(mod_name)
    except Exception as e:  # ImportError, or anything the user's module raises while importing
        raise fail(
            f"{field}: cannot import {mod_name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
            hint="check the module path; run from the directory that contains the package, or put it on PYTHONPATH",
        ) from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise fail(f"{field}: module {mod_name!r} has no attribute {attr!r}", hint="check the name after the ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise fail(
            f"{field}: {target} is a {type(obj).__name__}, not a callable factory", hint="name a function or class that builds the object"
        )
    return obj


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        top = name.split(".")[0]
        if e.name not in (top, name) and not name.startswith(f"{e.name}."):
            raise  # the module exists but imports something missing
        if cwd in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
        return importlib.import_module(name)
