"""The stated ranges of recipe values: upper bounds, safe run names, known device names, thread counts.

The schema (``recipes/schema.py``) uses these in its fields, so a value out of range fails at load time
(``--dry-run``) naming the field. Bounds that depend on the model and the machine (the memory a stage
needs) are checked by :mod:`dsk_compress.recipes.preflight` before a run starts.
"""

from __future__ import annotations

import os

MAX_STEPS = 10_000_000
"""Most optimizer steps (and warm-up, eval interval) of one training stage."""
MAX_BATCH = 65_536
"""Largest batch size anywhere; the memory a batch needs is checked against the machine as well."""
MAX_EVAL_SEQUENCES = 1_000_000
"""Most validation windows of a task."""
MAX_CALIBRATION_BATCHES = 100_000
"""Most calibration / observer batches."""
MAX_RUNS = 1_000_000
"""Most timed or warm-up runs of a measurement."""
MAX_SEED = 2**32 - 1
"""Seeds are 0..2**32-1 (what numpy and every torch device accept)."""
MAX_WIDTH = 1_000_000
"""Largest FFN width, layer index or layer count."""
THREADS_PER_CPU = 4
"""Thread counts may oversubscribe this machine's CPUs at most this many times."""


def max_threads() -> int:
    """The most threads a recipe may ask for on this machine: :data:`THREADS_PER_CPU` x its CPUs."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def threads_problem(n: int) -> str | None:
    """What is wrong with ``n`` threads on this machine (None: nothing): the one bound of the recipe's ``threads``,
    ``bench.threads`` and ``--threads``, 1 to :func:`max_threads`."""
    if 1 <= n <= max_threads():
        return None
    return (
        f"{n} is out of range: at least 1 and at most {THREADS_PER_CPU}x this machine's {max_threads() // THREADS_PER_CPU} CPUs; "
        f"use 1 to {max_threads()}"
    )


def check_threads_fit(n: int | None) -> int | None:
    """``n`` (or None) if this machine allows that many threads (:func:`threads_problem`), else ValueError saying why."""
    problem = None if n is None else threads_problem(n)
    if problem:
        raise ValueError(problem)
    return n


def check_run_name(name: str) -> str:
    """``name`` if it is a safe folder name (runs are ``<out>/<name>-<time>``), else ValueError saying what is allowed.

    Allowed: 1-100 characters, letters, digits, ``.``, ``_``, ``-``, ``+``, starting with a letter or digit,
    never ``..``; so no path separator, NUL, newline or other control character can reach a path
    (:func:`dsk_compress.paths.check_name`, the rule for every name that becomes a folder).
    """
    from dsk_compress.paths import check_name

    return check_name(name, "run name", "(runs are written to <out>/<name>-<time>)")


def check_device_name(name: str) -> str:
    """``name`` if it names a device profile (or a profile YAML), else ValueError listing the profiles."""
    from dsk_compress.devices import load_device
    from dsk_compress.errors import DeviceError

    try:
        load_device(name)
    except DeviceError as e:
        raise ValueError(str(e)) from None
    return name
