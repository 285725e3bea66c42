"""Tasks own data and metrics. ``build_task`` resolves a recipe's task spec."""

from __future__ import annotations

from typing import Any

from dsk_compress.errors import TaskError
from dsk_compress.tasks.base import Metrics, PredictFn, Task

BUILTIN_TASKS = ("code-lm", "text-lm")


def build_task(spec: dict[str, Any]) -> Task:
    """Build a task from ``{"name": "code-lm", ...options}``, or the user's own from ``{"torch": "pkg.mod:make_task", "options": {...}}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == "code-lm":
        from dsk_compress.tasks.code_lm import CodeLMTask

        try:
            return CodeLMTask(**spec)
        except TypeError as e:
            raise TaskError(
                f"bad option for task code-lm: {e}", hint="options: seq_len, eval_sequences, val_percent, seed, stdlib_root"
            ) from None
    if name == "text-lm":
        from dsk_compress.tasks.text_lm import TextLMTask

        return TextLMTask(**spec)
    if name == "torch" or (name is None and "torch" in spec):
        from dsk_compress.tasks.torch_task import load_torch_task

        return load_torch_task(spec["torch"], spec.get("options"))
    raise TaskError(f"unknown task {name!r}", hint=f"valid: {', '.join(BUILTIN_TASKS)}, or {{torch: 'package.module:make_task'}}")


__all__ = ["Metrics", "PredictFn", "Task", "build_task", "BUILTIN_TASKS"]
