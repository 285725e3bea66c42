"""Your own task: ``task: {torch: "package.module:make_task", options: {...}}`` in a recipe.

The factory is called with ``options`` as keyword arguments and must return an object with the
methods of the Task protocol (``dsk_compress.tasks.base``): ``train_batch(step, batch_size)``
(e.g. an ``(inputs, labels)`` tuple of tensors, a pure function of ``step``), ``eval_batches``,
``calibration_batches(n, batch_size)``, ``example_inputs(batch_size)``, ``evaluate(predict) -> Metrics``,
``fingerprint()`` and ``describe()``, plus a ``name``. ``evaluate`` receives a numpy-in, numpy-out
``predict`` function, so the same code scores the torch model and the exported ONNX artifact.
"""

from __future__ import annotations

from typing import Any

from dsk_compress.errors import TaskError

TASK_METHODS = ("train_batch", "eval_batches", "calibration_batches", "example_inputs", "evaluate", "fingerprint", "describe")


def load_torch_task(target: str, options: dict[str, Any] | None = None):
    """Build the task ``target`` names with ``options``; a bad target or an incomplete task is a one-line TaskError."""
    from dsk_compress.plugins import load_target

    factory = load_target(target, "task.torch", TaskError)
    try:
        task = factory(**(options or {}))
    except Exception as e:  # the user's factory: any error becomes one line naming it
        raise TaskError(
            f"task.torch: {target}(**task.options) raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            hint="check task.options against the factory's parameters",
        ) from None
    missing = [m for m in TASK_METHODS if not callable(getattr(task, m, None))]
    if missing or not isinstance(getattr(task, "name", None), str):
        missing += [] if isinstance(getattr(task, "name", None), str) else ["name (str attribute)"]
        raise TaskError(
            f"task.torch: {target} returned a {type(task).__name__} without {', '.join(missing)}",
            hint="implement the Task protocol of dsk_compress.tasks.base (see examples/digits/task.py)",
        )
    return task
