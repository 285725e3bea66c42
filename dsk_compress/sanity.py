"""Is the teacher worth distilling from? Its measured accuracy against chance and against the students.

A teacher can load cleanly and still be useless: weights that belong to another tokenizer, a damaged
checkpoint, the wrong task. Its accuracy on the task then sits near chance, and a report that ranks
students "above the teacher" would mislead. The distill stage records the teacher's accuracy next to
:func:`chance_accuracy`; the bench stage adds :func:`teacher_warning` to the teacher's report row.
"""

from __future__ import annotations

import numpy as np

NEAR_CHANCE_FACTOR = 2.0
"""A teacher below this multiple of chance accuracy is flagged."""


def chance_accuracy(task) -> float | None:
    """Accuracy (%) of always predicting the most frequent next token of the task's validation windows, or None for a
    task that is not next-token prediction over windows (e.g. your own classifier)."""
    if not hasattr(task, "_eval_starts") or not hasattr(task, "eval_batches"):
        return None
    counts = np.zeros(0, dtype=np.int64)
    for batch in task.eval_batches(64):
        targets = np.asarray(batch)[:, 1:].ravel().astype(np.int64)
        c = np.bincount(targets)
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[: len(c)] += c
    total = int(counts.sum())
    return 100.0 * int(counts.max()) / total if total else None


def teacher_warning(teacher_accuracy: float, chance: float | None, best_student: float | None = None) -> str | None:
    """A one-sentence warning when the teacher is near chance (below :data:`NEAR_CHANCE_FACTOR` x chance) or below a
    student measured on the same windows; None when it looks sound."""
    if chance is not None and teacher_accuracy < NEAR_CHANCE_FACTOR * chance:
        return (
            f"WARNING: the teacher scores {teacher_accuracy:.2f}%, near chance ({chance:.2f}% for always predicting the most "
            "frequent token): its weights, tokenizer or task do not match, and margins against it mean nothing"
        )
    if best_student is not None and teacher_accuracy < best_student:
        return (
            f"WARNING: the teacher ({teacher_accuracy:.2f}%) scores below a student ({best_student:.2f}%) on the same windows: "
            "check that the teacher's weights and tokenizer are the ones it was trained with"
        )
    return None


def flag_teacher_rows(variants: list[dict], chance: float | None) -> None:
    """Append :func:`teacher_warning` to the notes of the ``teacher`` row of bench ``variants`` (in place)."""
    teacher = next((v for v in variants if v.get("role") == "teacher"), None)
    if teacher is None or teacher.get("accuracy") is None:
        return
    students = [v["accuracy"] for v in variants if v is not teacher and v.get("accuracy") is not None]
    warning = teacher_warning(teacher["accuracy"], chance, max(students) if students else None)
    if warning:
        teacher["notes"] = "; ".join(x for x in (teacher.get("notes"), warning) if x)
