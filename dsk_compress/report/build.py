"""Build the accuracy-vs-latency report of a run directory.

A run ends with a list of measured *variants* (teacher, student, final, PTQ / pruned
variants, ...). :func:`build_report` adds numbers derived from those measurements
(speedup, size ratio and accuracy delta against the teacher), picks the variant to ship,
finds the Pareto front, and writes ``report.json``, ``report.md`` and ``report.html``
(plus ``pareto.png``) into the run directory. Nothing here measures or invents numbers:
every figure in the report comes from the variant dicts passed in.

The report is a :class:`~dsk_compress.report.model.Report`; the renderers
(:mod:`~dsk_compress.report.markdown`, :mod:`~dsk_compress.report.html`) turn it into files.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dsk_compress.errors import RunError
from dsk_compress.io import atomic_write_bytes, atomic_write_text
from dsk_compress.report.devices import device_sections
from dsk_compress.report.format import DASH, fmt, format_size_mb
from dsk_compress.report.html import render_html
from dsk_compress.report.markdown import render_markdown
from dsk_compress.report.model import (
    REPORT_SCHEMA_VERSION,
    VARIANT_KEYS,
    DeviceSection,
    DistillationMargin,
    Report,
    Summary,
    Variant,
    describe_error,
    finite,
    read_report,
    save_report,
)
from dsk_compress.report.pareto import pareto_front

DEFAULT_MAX_ACCURACY_DROP = 3.0
"""Accuracy points a shipped variant may lose against the teacher, unless meta says otherwise."""

REPORT_MD = "report.md"
REPORT_HTML = "report.html"

_BENCH_HINT = "re-run the benchmark stage"


def _ratio(num: Any, den: Any) -> float | None:
    n, d = finite(num), finite(den)
    if n is None or d is None or d <= 0 or n < 0:
        return None
    return n / d


# --------------------------------------------------------------------------- variants


def _check_variants(variants: list[dict]) -> list[Variant]:
    """The measured variant dicts as :class:`Variant` models; every key of VARIANT_KEYS present, names unique."""
    names: set[str] = set()
    out = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict):
            raise RunError(f"variant #{i} is not a mapping", hint=_BENCH_HINT)
        missing = [k for k in VARIANT_KEYS if k not in v]
        if missing:
            label = v.get("name", f"#{i}")
            raise RunError(f"variant {label} lacks {', '.join(missing)}", hint=_BENCH_HINT)
        if v["name"] in names:
            raise RunError(f"two variants are named {v['name']!r}", hint="variant names must be unique")
        names.add(v["name"])
        try:
            out.append(Variant.model_validate(v))
        except ValidationError as e:
            raise RunError(f"variant {v['name']}: {describe_error(e, v)}", hint=_BENCH_HINT) from None
    return out


def _first_with_role(variants: list[Variant], role: str) -> Variant | None:
    return next((v for v in variants if v.role == role), None)


def _derive(v: Variant, teacher: Variant | None) -> Variant:
    """``v`` with speedup, size ratio and accuracy delta against ``teacher`` (None without one)."""
    if teacher is None:
        return v.model_copy(update={"speedup_vs_teacher": None, "size_ratio_vs_teacher": None, "accuracy_delta_vs_teacher": None})
    acc, tacc = finite(v.accuracy), finite(teacher.accuracy)
    # a speed-up only against a teacher measured by the same runtime (e.g. never ONNX Runtime vs a PyTorch-eager teacher)
    same = (v.runtime or "").split("-")[0] == (teacher.runtime or "").split("-")[0]
    return v.model_copy(
        update={
            "speedup_vs_teacher": _ratio(teacher.p50, v.p50) if same else None,
            "size_ratio_vs_teacher": _ratio(teacher.size_bytes, v.size_bytes),
            "accuracy_delta_vs_teacher": None if acc is None or tacc is None else acc - tacc,
        }
    )


# --------------------------------------------------------------------------- recommendation


def _describe(v: Variant, with_teacher: bool) -> str:
    """One clause of measured numbers for the recommendation sentence."""
    parts = [f"accuracy {fmt(v.accuracy)}%"]
    delta = finite(v.accuracy_delta_vs_teacher)
    if with_teacher and delta is not None and v.role != "teacher":
        side = "above" if delta > 0 else "below"
        parts[0] += f" ({abs(delta):.2f} points {side} the teacher)" if delta != 0 else " (same as the teacher)"
    parts.append(f"p50 {fmt(v.p50)} ms")
    if with_teacher and v.role != "teacher":
        speed = finite(v.speedup_vs_teacher)
        size = finite(v.size_ratio_vs_teacher)
        if speed is not None:
            parts.append(f"speedup {speed:.2f}× vs the teacher")
        if size is not None:
            parts.append(f"size ratio {size:.2f}× vs the teacher")
    parts.append(f"{format_size_mb(v.size_bytes)} MB on {v.runtime or DASH}")
    return ", ".join(parts)


def _recommend(
    variants: list[Variant], teacher: Variant | None, final: Variant | None, max_drop: float, chance: float | None = None
) -> tuple[Variant | None, str]:
    """:func:`_pick`, except that nothing near chance (below ``NEAR_CHANCE_FACTOR`` x ``chance``) is ever recommended: a
    teacher near chance means its students learned from noise, and a pick near chance is no model worth shipping."""
    from dsk_compress.sanity import NEAR_CHANCE_FACTOR

    bar = None if chance is None else NEAR_CHANCE_FACTOR * chance
    tacc = finite(teacher.accuracy) if teacher else None
    near = f"near chance ({chance:.2f}% for always predicting the most frequent token)" if chance is not None else ""
    if bar is not None and tacc is not None and tacc < bar:
        return None, (
            f"ship nothing: the teacher `{teacher.name}` scores {tacc:.2f}%, {near}, so no variant distilled from it "
            "is worth shipping. Check that the teacher's weights, tokenizer and task belong together, then run again."
        )
    pick, why = _pick(variants, teacher, final, max_drop)
    acc = finite(pick.accuracy) if pick is not None else None
    if bar is not None and acc is not None and acc < bar:
        return None, (
            f"ship nothing: the best candidate `{pick.name}` scores {acc:.2f}%, {near}. Train longer or prune less, then run again."
        )
    return pick, why


def _pick(variants: list[Variant], teacher: Variant | None, final: Variant | None, max_drop: float) -> tuple[Variant | None, str]:
    """Pick the variant to ship and say why, using only measured numbers.

    Rules: the ``final`` variant when its accuracy is within ``max_drop`` points of the
    teacher; otherwise the fastest (lowest p50) variant within that drop (this may be the
    teacher itself); otherwise the most accurate variant. Without a teacher the drop
    cannot be checked: the ``final`` variant is recommended if there is one, else the
    most accurate variant.
    """
    if not variants:
        return None, "no variants were measured."
    with_acc = [v for v in variants if finite(v.accuracy) is not None]
    most_accurate = max(with_acc, key=lambda v: finite(v.accuracy)) if with_acc else None
    tacc = finite(teacher.accuracy) if teacher else None

    if teacher is None or tacc is None:
        unchecked = "No teacher accuracy was measured, so the accuracy budget could not be checked."
        if final is not None:
            return final, f"ship `{final.name}` (the final variant): {_describe(final, False)}. {unchecked}"
        if most_accurate is not None:
            return most_accurate, (
                f"ship `{most_accurate.name}`, the most accurate variant: {_describe(most_accurate, False)}. {unchecked}"
            )
        return None, "no variant has a measured accuracy."

    floor = tacc - max_drop - 1e-9  # tolerate float rounding of e.g. 90.1 - 3.0
    budget = f"the {max_drop:g}-point accuracy budget"
    final_acc = finite(final.accuracy) if final is not None else None
    if final is not None and final_acc is not None and final_acc >= floor:
        return final, f"ship `{final.name}` (the final variant), within {budget}: {_describe(final, True)}."

    why_not_final = ""
    if final is not None:
        d = finite(final.accuracy_delta_vs_teacher)
        lost = f"loses {-d:.2f} points vs the teacher" if d is not None else "has no measured accuracy"
        why_not_final = f" The final variant `{final.name}` {lost}, outside {budget}."
    within = [v for v in with_acc if finite(v.accuracy) >= floor and v.p50 is not None]
    if within:
        best = min(within, key=lambda v: (v.p50, -finite(v.accuracy)))
        if best is teacher:
            return best, (
                f"ship the teacher `{best.name}`: no compressed variant is both faster and within {budget}; "
                f"{_describe(best, True)}.{why_not_final}"
            )
        return best, f"ship `{best.name}`, the fastest variant within {budget}: {_describe(best, True)}.{why_not_final}"
    assert most_accurate is not None
    return most_accurate, (
        f"ship `{most_accurate.name}`, the most accurate variant (none is within {budget} "
        f"with a measured latency): {_describe(most_accurate, True)}.{why_not_final}"
    )


# (role of the variant compared, role of its baseline, what the gap measures)
_KD_COMPARISONS = (
    ("student", "student-nokd", "KD vs no KD, same init"),
    ("student", "student-random-init", "expert-merged (student init) vs random FFN init, both with KD"),
    ("student-random-init", "student-random-init-nokd", "KD vs no KD, random FFN init"),
    ("student", "student-random-init-nokd", "student init + KD vs neither"),
)


def distillation_margins(variants: list[Variant]) -> list[DistillationMargin]:
    """Accuracy gaps between the distilled student and the distill-stage baselines present in ``variants``,
    from the accuracies measured on the exported artifacts (points; positive: the first one is better)."""
    distilled = next((v for v in variants if v.role == "student" and v.stage == "distill"), None)
    by_role = {"student": distilled, **{v.role: v for v in variants if str(v.role).startswith("student-")}}
    out = []
    for a, b, what in _KD_COMPARISONS:
        va, vb = by_role.get(a), by_role.get(b)
        acc_a, acc_b = (finite(va.accuracy), finite(vb.accuracy)) if va and vb else (None, None)
        if va and vb and acc_a is not None and acc_b is not None:
            out.append(
                DistillationMargin(
                    variant=va.name,
                    baseline=vb.name,
                    compares=what,
                    accuracy=acc_a,
                    baseline_accuracy=acc_b,
                    margin=round(acc_a - acc_b, 4),
                )
            )
    return out


def summarize(
    variants: list[Variant], max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP, chance_accuracy: float | None = None
) -> Summary:
    """Summary block of a report from variants that already carry the derived fields.

    Args:
        variants: variants including ``speedup_vs_teacher`` etc. (see :func:`build_report`).
        max_accuracy_drop: accuracy points the shipped variant may lose against the teacher.
        chance_accuracy: the task's chance accuracy (%), if known: nothing near it is recommended.

    Returns:
        The teacher, final and recommended variant names (or None), the recommendation
        sentence built from the measured numbers, the Pareto-optimal variant names (lowest
        p50 latency, highest accuracy) in input order, the accuracy budget and the
        distillation margins.
    """
    teacher = _first_with_role(variants, "teacher")
    final = _first_with_role(variants, "final")
    rec, why = _recommend(variants, teacher, final, max_accuracy_drop, chance_accuracy)
    front = pareto_front([(v.p50, finite(v.accuracy)) for v in variants])
    summary = Summary(
        teacher=teacher.name if teacher else None,
        final=final.name if final else None,
        recommended=rec.name if rec else None,
        recommendation=why[0].upper() + why[1:],
        pareto=[variants[i].name for i in front],
        max_accuracy_drop=max_accuracy_drop,
        distillation=distillation_margins(variants),
    )
    if chance_accuracy is not None:  # set only when known: older reports keep their exact JSON
        summary.chance_accuracy = chance_accuracy
    return summary


# --------------------------------------------------------------------------- report


def assemble_report(variants: list[dict], meta: dict, devices: Sequence[DeviceSection] = ()) -> Report:
    """The report as a :class:`Report` model (no files written). See :func:`build_report`."""
    parsed = _check_variants(variants)
    teacher = _first_with_role(parsed, "teacher")
    derived = [_derive(v, teacher) for v in parsed]
    drop = finite(meta.get("max_accuracy_drop"))
    drop = DEFAULT_MAX_ACCURACY_DROP if drop is None else drop
    fields = {"run": meta.get("run"), "recipe": meta.get("recipe"), "task": meta.get("task"), "host": meta.get("host")}
    try:
        return Report(
            schema_version=REPORT_SCHEMA_VERSION,
            **fields,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            variants=derived,
            summary=summarize(derived, drop, finite(meta.get("chance_accuracy"))),
            devices=list(devices),
        )
    except ValidationError as e:
        raise RunError(
            f"report metadata: {describe_error(e, fields)}", hint="meta: run, recipe and task are strings, host a string or a mapping"
        ) from None


def make_report(variants: list[dict], meta: dict) -> dict:
    """Build the report object in memory (no files written) as the dict written to ``report.json``.

    See :func:`build_report`.
    """
    return assemble_report(variants, meta).to_dict()


def build_report(run_dir: Path, variants: list[dict], meta: dict) -> dict:
    """Build the accuracy-vs-latency report of a run and write it into ``run_dir``.

    Each variant gets three derived fields, all None when no variant has role
    ``"teacher"`` (or the needed numbers are missing or zero):

    * ``speedup_vs_teacher`` = teacher p50 latency / variant p50 latency
    * ``size_ratio_vs_teacher`` = teacher ``size_bytes`` / variant ``size_bytes``
    * ``accuracy_delta_vs_teacher`` = variant accuracy − teacher accuracy (points)

    The summary names the teacher, the final variant, the recommended variant (the
    ``final`` one if its accuracy is within ``meta["max_accuracy_drop"]`` (default 3.0)
    points of the teacher, else the fastest variant within that drop, else the most
    accurate) and the Pareto-optimal variants (minimise p50, maximise accuracy).

    Writes ``pareto.png``, ``report.md``, ``report.html`` and lastly ``report.json``,
    each atomically; everything is rendered before anything is written.

    Args:
        run_dir: the run directory (created if missing).
        variants: measured variant dicts with the keys in :data:`VARIANT_KEYS`; not modified.
        meta: run metadata; reads ``run``, ``recipe``, ``task``, ``host``,
            ``max_accuracy_drop`` and ``chance_accuracy`` (nothing near chance is recommended).

    Returns:
        The report dict, as written to ``report.json``.

    Raises:
        RunError: a variant lacks a key or has a malformed value, or two variants share a name.
    """
    run_dir = Path(run_dir)
    report = assemble_report(variants, meta, device_sections(run_dir, _check_variants(variants)))
    return write_report(run_dir, report)


def rebuild_report(run_dir: Path) -> dict:
    """Rebuild a run's report from its files: the host rows of ``report.json`` and every
    ``devices/<name>/results.json`` (re-read, so a device measured again replaces its section).

    Returns:
        The report dict, as written to ``report.json`` (and ``.md`` / ``.html``).

    Raises:
        RunError: the run has no readable report, or a results file is malformed.
    """
    run_dir = Path(run_dir)
    old = read_report(run_dir)
    report = old.model_copy(
        update={
            "schema_version": REPORT_SCHEMA_VERSION,
            "devices": device_sections(run_dir, old.variants),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return write_report(run_dir, report)


def write_report(run_dir: Path, report: Report) -> dict:
    """Render ``report`` and write ``pareto*.png``, ``report.md``, ``report.html`` and lastly ``report.json`` atomically."""
    md = render_markdown(report)
    page, pngs = render_html(report)
    for name, png in pngs.items():
        atomic_write_bytes(run_dir / name, png)
    atomic_write_text(run_dir / REPORT_MD, md)
    atomic_write_text(run_dir / REPORT_HTML, page)
    save_report(run_dir, report)
    return report.to_dict()
