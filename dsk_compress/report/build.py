"""Accuracy-vs-latency report for a compression run directory.

A run ends with a list of measured *variants* (teacher, student, final, PTQ / pruned
variants, ...). :func:`build_report` adds numbers derived from those measurements
(speedup, size ratio and accuracy delta against the teacher), picks the variant to ship,
finds the Pareto front, and writes ``report.json``, ``report.md`` and ``report.html``
(plus ``pareto.png``) into the run directory. Nothing here measures or invents numbers:
every figure in the report comes from the variant dicts passed in.

Heavy imports (rich, matplotlib) happen inside the functions that need them, so importing
this module stays cheap.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dsk_compress.errors import RunError
from dsk_compress.io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

REPORT_SCHEMA_VERSION = 1
"""Version of the ``report.json`` layout; :func:`load_report` refuses newer ones."""

DEFAULT_MAX_ACCURACY_DROP = 3.0
"""Accuracy points a shipped variant may lose against the teacher, unless meta says otherwise."""

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PARETO_PNG = "pareto.png"

VARIANT_KEYS = (
    "name",
    "role",
    "stage",
    "params",
    "size_bytes",
    "accuracy",
    "bits_per_byte",
    "latency_ms",
    "throughput",
    "peak_memory_mb",
    "runtime",
    "device",
    "precision",
    "artifact",
    "notes",
)
"""Keys every measured variant dict must have."""

DASH = "—"


# --------------------------------------------------------------------------- numbers


def _num(x: Any) -> float | None:
    """Return ``x`` as a finite float, or None when it is missing, not a number or NaN/inf."""
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _p50(v: dict) -> float | None:
    lat = v.get("latency_ms")
    return _num(lat.get("p50")) if isinstance(lat, dict) else None


def _lat(v: dict, key: str) -> float | None:
    lat = v.get("latency_ms")
    return _num(lat.get(key)) if isinstance(lat, dict) else None


def _ratio(num: Any, den: Any) -> float | None:
    n, d = _num(num), _num(den)
    if n is None or d is None or d <= 0 or n < 0:
        return None
    return n / d


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when minimising latency and maximising accuracy.

    A point is dominated when another point is at least as fast *and* at least as
    accurate, and strictly better in one of the two. Identical points do not dominate
    each other, so both stay on the front. Points with a missing or non-finite
    coordinate are never on the front.

    Args:
        points: ``(latency, accuracy)`` pairs.

    Returns:
        Indices into ``points`` of the Pareto-optimal points, in ascending index order.
    """
    clean: list[tuple[int, float, float]] = []
    for i, p in enumerate(points):
        lat, acc = _num(p[0]), _num(p[1])
        if lat is not None and acc is not None:
            clean.append((i, lat, acc))
    front = []
    for i, li, ai in clean:
        dominated = any(
            lj <= li and aj >= ai and (lj < li or aj > ai) for j, lj, aj in clean if j != i
        )
        if not dominated:
            front.append(i)
    return front


# --------------------------------------------------------------------------- formatting


def format_params(n: Any) -> str:
    """Human-readable parameter count: ``1234567`` -> ``"1.23M"``, ``None`` -> ``"—"``."""
    x = _num(n)
    if x is None:
        return DASH
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}"
    return str(int(x))


def format_size_mb(size_bytes: Any) -> str:
    """Bytes as megabytes (10^6 bytes) with 2 decimals, or ``"—"``."""
    x = _num(size_bytes)
    return DASH if x is None else f"{x / 1e6:.2f}"


def _fmt(x: Any, decimals: int = 2, suffix: str = "") -> str:
    f = _num(x)
    return DASH if f is None else f"{f:.{decimals}f}{suffix}"


def _host_str(host: Any) -> str:
    if host is None or host == "":
        return DASH
    if isinstance(host, dict):
        for key in ("name", "hostname", "host"):
            if host.get(key):
                return str(host[key])
        return ", ".join(f"{k}: {v}" for k, v in host.items()) or DASH
    return str(host)


def _unique(values: list[Any]) -> str:
    seen: list[str] = []
    for v in values:
        if v not in (None, "") and str(v) not in seen:
            seen.append(str(v))
    return ", ".join(seen) if seen else DASH


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- report


def _check_variants(variants: list[dict]) -> None:
    names: set[str] = set()
    for i, v in enumerate(variants):
        if not isinstance(v, dict):
            raise RunError(f"variant #{i} is not a mapping", hint="re-run the benchmark stage")
        missing = [k for k in VARIANT_KEYS if k not in v]
        if missing:
            label = v.get("name", f"#{i}")
            raise RunError(
                f"variant {label} lacks {', '.join(missing)}", hint="re-run the benchmark stage"
            )
        if v["name"] in names:
            raise RunError(f"two variants are named {v['name']!r}", hint="variant names must be unique")
        names.add(v["name"])


def _first_with_role(variants: list[dict], role: str) -> dict | None:
    return next((v for v in variants if v.get("role") == role), None)


def _derive(v: dict, teacher: dict | None) -> dict:
    out = dict(v)
    out["latency_ms"] = dict(v["latency_ms"]) if isinstance(v.get("latency_ms"), dict) else v.get("latency_ms")
    if teacher is None:
        out["speedup_vs_teacher"] = None
        out["size_ratio_vs_teacher"] = None
        out["accuracy_delta_vs_teacher"] = None
        return out
    out["speedup_vs_teacher"] = _ratio(_p50(teacher), _p50(v))
    out["size_ratio_vs_teacher"] = _ratio(teacher.get("size_bytes"), v.get("size_bytes"))
    acc, tacc = _num(v.get("accuracy")), _num(teacher.get("accuracy"))
    out["accuracy_delta_vs_teacher"] = None if acc is None or tacc is None else acc - tacc
    return out


def _describe(v: dict, with_teacher: bool) -> str:
    """One clause of measured numbers for the recommendation sentence."""
    parts = [f"accuracy {_fmt(v.get('accuracy'))}%"]
    delta = _num(v.get("accuracy_delta_vs_teacher"))
    if with_teacher and delta is not None and v.get("role") != "teacher":
        side = "above" if delta > 0 else "below"
        parts[0] += f" ({abs(delta):.2f} points {side} the teacher)" if delta != 0 else " (same as the teacher)"
    parts.append(f"p50 {_fmt(_p50(v))} ms")
    if with_teacher and v.get("role") != "teacher":
        speed = _num(v.get("speedup_vs_teacher"))
        size = _num(v.get("size_ratio_vs_teacher"))
        if speed is not None:
            parts.append(f"speedup {speed:.2f}× vs the teacher")
        if size is not None:
            parts.append(f"size ratio {size:.2f}× vs the teacher")
    parts.append(f"{format_size_mb(v.get('size_bytes'))} MB on {v.get('runtime') or DASH}")
    return ", ".join(parts)


def _recommend(variants: list[dict], teacher: dict | None, final: dict | None, max_drop: float) -> tuple[dict | None, str]:
    """Pick the variant to ship and say why, using only measured numbers.

    Rules: the ``final`` variant when its accuracy is within ``max_drop`` points of the
    teacher; otherwise the fastest (lowest p50) variant within that drop (this may be the
    teacher itself); otherwise the most accurate variant. Without a teacher the drop
    cannot be checked: the ``final`` variant is recommended if there is one, else the
    most accurate variant.
    """
    if not variants:
        return None, "no variants were measured."
    with_acc = [v for v in variants if _num(v.get("accuracy")) is not None]
    most_accurate = max(with_acc, key=lambda v: _num(v["accuracy"])) if with_acc else None
    tacc = _num(teacher.get("accuracy")) if teacher else None

    if teacher is None or tacc is None:
        if final is not None:
            return final, (
                f"ship `{final['name']}` (the final variant): {_describe(final, False)}. "
                "No teacher accuracy was measured, so the accuracy budget could not be checked."
            )
        if most_accurate is not None:
            return most_accurate, (
                f"ship `{most_accurate['name']}`, the most accurate variant: {_describe(most_accurate, False)}. "
                "No teacher accuracy was measured, so the accuracy budget could not be checked."
            )
        return None, "no variant has a measured accuracy."

    floor = tacc - max_drop - 1e-9  # tolerate float rounding of e.g. 90.1 - 3.0
    budget = f"the {max_drop:g}-point accuracy budget"
    if final is not None and _num(final.get("accuracy")) is not None and _num(final["accuracy"]) >= floor:
        return final, f"ship `{final['name']}` (the final variant), within {budget}: {_describe(final, True)}."

    why_not_final = ""
    if final is not None:
        d = _num(final.get("accuracy_delta_vs_teacher"))
        lost = f"loses {-d:.2f} points vs the teacher" if d is not None else "has no measured accuracy"
        why_not_final = f" The final variant `{final['name']}` {lost}, outside {budget}."
    within = [v for v in with_acc if _num(v["accuracy"]) >= floor and _p50(v) is not None]
    if within:
        best = min(within, key=lambda v: (_p50(v), -_num(v["accuracy"])))
        if best is teacher:
            return best, (
                f"ship the teacher `{best['name']}`: no compressed variant is both faster and within {budget}; "
                f"{_describe(best, True)}.{why_not_final}"
            )
        return best, (
            f"ship `{best['name']}`, the fastest variant within {budget}: {_describe(best, True)}.{why_not_final}"
        )
    assert most_accurate is not None
    return most_accurate, (
        f"ship `{most_accurate['name']}`, the most accurate variant (none is within {budget} "
        f"with a measured latency): {_describe(most_accurate, True)}.{why_not_final}"
    )


# (role of the variant compared, role of its baseline, what the gap measures)
_KD_COMPARISONS = (
    ("student", "student-nokd", "KD vs no KD, same init"),
    ("student", "student-random-init", "expert-merged (student init) vs random FFN init, both with KD"),
    ("student-random-init", "student-random-init-nokd", "KD vs no KD, random FFN init"),
    ("student", "student-random-init-nokd", "student init + KD vs neither"),
)


def distillation_margins(variants: list[dict]) -> list[dict]:
    """Accuracy gaps between the distilled student and the distill-stage baselines present in ``variants``,
    from the accuracies measured on the exported artifacts (points; positive: the first one is better)."""
    distilled = next((v for v in variants if v.get("role") == "student" and v.get("stage") == "distill"), None)
    by_role = {"student": distilled, **{v["role"]: v for v in variants if str(v.get("role", "")).startswith("student-")}}
    out = []
    for a, b, what in _KD_COMPARISONS:
        va, vb = by_role.get(a), by_role.get(b)
        acc_a, acc_b = (_num(va.get("accuracy")), _num(vb.get("accuracy"))) if va and vb else (None, None)
        if acc_a is not None and acc_b is not None:
            out.append({"variant": va["name"], "baseline": vb["name"], "compares": what, "accuracy": acc_a,
                        "baseline_accuracy": acc_b, "margin": round(acc_a - acc_b, 4)})
    return out


def summarize(variants: list[dict], max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP) -> dict:
    """Summary block of a report from variants that already carry the derived fields.

    Args:
        variants: variant dicts including ``speedup_vs_teacher`` etc. (see :func:`build_report`).
        max_accuracy_drop: accuracy points the shipped variant may lose against the teacher.

    Returns:
        ``{"teacher", "final", "recommended", "recommendation", "pareto", "max_accuracy_drop"}``
        where the first three are variant names (or None), ``recommendation`` is a sentence
        built from the measured numbers and ``pareto`` lists the Pareto-optimal variant names
        (lowest p50 latency, highest accuracy) in input order.
    """
    teacher = _first_with_role(variants, "teacher")
    final = _first_with_role(variants, "final")
    rec, why = _recommend(variants, teacher, final, max_accuracy_drop)
    front = pareto_front([(_p50(v), _num(v.get("accuracy"))) for v in variants])
    return {
        "teacher": teacher["name"] if teacher else None,
        "final": final["name"] if final else None,
        "recommended": rec["name"] if rec else None,
        "recommendation": why[0].upper() + why[1:] if why else why,
        "pareto": [variants[i]["name"] for i in front],
        "max_accuracy_drop": max_accuracy_drop,
        "distillation": distillation_margins(variants),
    }


def make_report(variants: list[dict], meta: dict) -> dict:
    """Build the report object in memory (no files written). See :func:`build_report`."""
    _check_variants(variants)
    teacher = _first_with_role(variants, "teacher")
    derived = [_derive(v, teacher) for v in variants]
    drop = _num(meta.get("max_accuracy_drop"))
    drop = DEFAULT_MAX_ACCURACY_DROP if drop is None else drop
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run": meta.get("run"),
        "recipe": meta.get("recipe"),
        "task": meta.get("task"),
        "host": meta.get("host"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "variants": derived,
        "summary": summarize(derived, drop),
    }


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
        meta: run metadata; reads ``run``, ``recipe``, ``task``, ``host`` and
            ``max_accuracy_drop``.

    Returns:
        The report dict, as written to ``report.json``.

    Raises:
        RunError: a variant lacks a key, or two variants share a name.
    """
    from dsk_compress.report.html import render_html

    run_dir = Path(run_dir)
    report = make_report(variants, meta)
    md = render_markdown(report)
    page, png = render_html(report)
    atomic_write_bytes(run_dir / PARETO_PNG, png)
    atomic_write_text(run_dir / REPORT_MD, md)
    atomic_write_text(run_dir / REPORT_HTML, page)
    atomic_write_json(run_dir / REPORT_JSON, report)
    return report


# --------------------------------------------------------------------------- table rows

TABLE_COLUMNS = (
    "Variant",
    "Role",
    "Params",
    "Size (MB)",
    "Accuracy (%)",
    "Bits/byte",
    "p50 (ms)",
    "p99 (ms)",
    "Speedup",
    "Size ratio",
    "Runtime",
)

DECODE_COLUMN = "Decode (tok/s)"
"""Appended to the table when a variant has ``decode_tokens_per_s`` (greedy decode with its KV-cache graph)."""


def _has_decode(report: dict) -> bool:
    return any(_num(v.get("decode_tokens_per_s")) is not None for v in report.get("variants", []))


def table_columns(report: dict) -> tuple[str, ...]:
    """Column titles of ``report``'s table: :data:`TABLE_COLUMNS`, plus :data:`DECODE_COLUMN` when a variant has one."""
    return TABLE_COLUMNS + (DECODE_COLUMN,) if _has_decode(report) else TABLE_COLUMNS


def table_rows(report: dict) -> list[list[str]]:
    """Formatted cells (see :func:`table_columns`) of one row per variant of ``report``."""
    rows = []
    decode = _has_decode(report)
    for v in report.get("variants", []):
        rows.append(
            [
                str(v.get("name")),
                str(v.get("role")),
                format_params(v.get("params")),
                format_size_mb(v.get("size_bytes")),
                _fmt(v.get("accuracy")),
                _fmt(v.get("bits_per_byte"), 3),
                _fmt(_lat(v, "p50")),
                _fmt(_lat(v, "p99")),
                _fmt(v.get("speedup_vs_teacher"), 2, "×"),
                _fmt(v.get("size_ratio_vs_teacher"), 2, "×"),
                str(v.get("runtime") or DASH),
            ]
        )
        if decode:  # a dash for variants without a KV-cache graph
            rows[-1].append(_fmt(v.get("decode_tokens_per_s"), 1))
    return rows


def header_fields(report: dict) -> list[tuple[str, str]]:
    """``(label, value)`` pairs for the report header: recipe, task, host, device, runtime."""
    variants = report.get("variants", [])
    return [
        ("Recipe", str(report.get("recipe") or DASH)),
        ("Task", str(report.get("task") or DASH)),
        ("Host", _host_str(report.get("host"))),
        ("Device", _unique([v.get("device") for v in variants])),
        ("Runtime", _unique([v.get("runtime") for v in variants])),
    ]


def measurement_note(report: dict) -> str:
    """The sentence that says where and how latencies were measured."""
    host = _host_str(report.get("host"))
    where = "this host" if host == DASH else f"this host ({host})"
    return (
        f"All latencies were measured on {where} at batch size 1, "
        "with the runtime named in each row; sizes are artifact file sizes in MB (10^6 bytes)."
    )


def margin_text(m: dict) -> str:
    """``student-distill`` 70.64% vs ``student-nokd`` 70.54%: +0.10 points"""
    return f"`{m['variant']}` {m['accuracy']:.2f}% vs `{m['baseline']}` {m['baseline_accuracy']:.2f}%: {m['margin']:+.2f} points"


def render_markdown(report: dict) -> str:
    """Render ``report.md``: title, header, variant table, recommendation and measurement note."""
    title = report.get("run") or "run"
    lines = [f"# Compression report: {title}", ""]
    for label, value in header_fields(report):
        lines.append(f"- **{label}:** {value}")
    if report.get("created"):
        lines.append(f"- **Created:** {report['created']}")
    lines.append("")
    rows = table_rows(report)
    if rows:
        cols = table_columns(report)
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join(["---", "---"] + ["---:"] * 8 + ["---"] + ["---:"] * (len(cols) - len(TABLE_COLUMNS))) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    else:
        lines.append("_No variants were measured._")
    lines.append("")
    notes = [v for v in report.get("variants", []) if v.get("notes") or v.get("peak_memory_mb") or v.get("decode")]
    if notes:
        lines.append("**Variants:**")
        for v in notes:
            mem = f"peak RSS {v['peak_memory_mb']:.0f} MB" if v.get("peak_memory_mb") else ""
            dec = v.get("decode") if isinstance(v.get("decode"), dict) else {}
            dec = (f"KV-cache greedy decode {_fmt(dec.get('decode_ms_p50'), 3)} ms/token p50, prefill of "
                   f"{dec.get('prompt_tokens', '?')} tokens {_fmt(dec.get('prefill_ms'), 2)} ms") if dec else ""
            detail = "; ".join(x for x in (v.get("notes") or "", f"{v.get('precision', '')}", mem, dec) if x)
            lines.append(f"- `{v['name']}`: {detail}")
        lines.append("")
    summary = report.get("summary", {})
    if summary.get("recommendation"):
        lines.append(f"**Recommendation:** {summary['recommendation']}")
        lines.append("")
    if summary.get("pareto"):
        lines.append("**Pareto-optimal (p50 latency vs accuracy):** " + ", ".join(f"`{n}`" for n in summary["pareto"]))
        lines.append("")
    if summary.get("distillation"):
        lines.append("**Distillation (same token budget, accuracy measured on the exported models):**")
        lines += [f"- {m['compares']}: {margin_text(m)}" for m in summary["distillation"]]
        lines.append("")
    lines.append(f"_{measurement_note(report)}_")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- loading


def load_report(run_dir: Path) -> dict:
    """Read ``report.json`` from a run directory.

    Args:
        run_dir: the run directory.

    Returns:
        The report dict.

    Raises:
        RunError: the directory or file is missing, the JSON is corrupt or not a report,
            or its ``schema_version`` is newer than :data:`REPORT_SCHEMA_VERSION`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}", hint="check the path, e.g. runs/<name>")
    path = run_dir / REPORT_JSON
    if not path.is_file():
        raise RunError(f"no {REPORT_JSON} in {run_dir}", hint="the run has not finished; resume it with dsk-compress recipe")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise RunError(f"corrupt JSON in {path}: {detail}", hint="delete it and re-run the report stage") from None
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise RunError(f"{path} is not a report", hint="delete it and re-run the report stage")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunError(f"{path} has no valid schema_version", hint="delete it and re-run the report stage")
    if version > REPORT_SCHEMA_VERSION:
        raise RunError(
            f"{path} has schema_version {version}, newer than the supported {REPORT_SCHEMA_VERSION}",
            hint="upgrade dsk-compress",
        )
    return data


# --------------------------------------------------------------------------- console


def compare_reports(run_dirs: list[Path]) -> list[dict]:
    """Load the reports of several runs for a side-by-side comparison.

    Each returned report gets ``run_dir`` (str) added, and ``run`` set to the directory
    name when the report has none. Pass the result to :func:`render_comparison` or
    :func:`comparison_rows`.

    Args:
        run_dirs: run directories, each holding a ``report.json``.

    Returns:
        The loaded report dicts, in the order given.

    Raises:
        RunError: no directory given, or one of them has no readable report.
    """
    if not run_dirs:
        raise RunError("no run directories to compare", hint="dsk-compress report runs/A runs/B")
    reports = []
    for d in run_dirs:
        rep = load_report(Path(d))
        rep["run_dir"] = str(d)
        if not rep.get("run"):
            rep["run"] = Path(d).name
        reports.append(rep)
    return reports


def comparison_rows(reports: list[dict]) -> list[dict]:
    """One flat row per (run, variant): run, variant, role, accuracy, p50_ms, size_mb, speedup, recommended."""
    rows = []
    for rep in reports:
        run = rep.get("run") or Path(rep.get("run_dir", "")).name or DASH
        recommended = rep.get("summary", {}).get("recommended")
        for v in rep.get("variants", []):
            size = _num(v.get("size_bytes"))
            rows.append(
                {
                    "run": str(run),
                    "variant": v.get("name"),
                    "role": v.get("role"),
                    "accuracy": _num(v.get("accuracy")),
                    "p50_ms": _lat(v, "p50"),
                    "size_mb": None if size is None else size / 1e6,
                    "speedup": _num(v.get("speedup_vs_teacher")),
                    "recommended": v.get("name") == recommended,
                }
            )
    return rows


def render_comparison(reports: list[dict], console: Console) -> None:
    """Print a rich table comparing several runs, one row per (run, variant).

    Args:
        reports: report dicts, e.g. from :func:`compare_reports`.
        console: where to print.
    """
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Run comparison", caption="★ recommended variant of its run; latencies at batch 1 on each run's host")
    table.add_column("Run", style="cyan")
    table.add_column("Variant")
    table.add_column("Role", style="dim")
    table.add_column("Accuracy (%)", justify="right")
    table.add_column("p50 (ms)", justify="right")
    table.add_column("Size (MB)", justify="right")
    table.add_column("Speedup", justify="right")
    last_run = None
    for row in comparison_rows(reports):
        if last_run is not None and row["run"] != last_run:
            table.add_section()
        last_run = row["run"]
        name = f"★ {row['variant']}" if row["recommended"] else str(row["variant"])
        cells = [
            row["run"],
            name,
            str(row["role"]),
            _fmt(row["accuracy"]),
            _fmt(row["p50_ms"]),
            _fmt(row["size_mb"]),
            _fmt(row["speedup"], 2, "×"),
        ]
        # Text cells: names such as "student[kd]" must not be parsed as rich markup.
        table.add_row(*(Text(c) for c in cells), style="bold green" if row["recommended"] else None)
    console.print(table)


def render_summary_table(report: dict, console: Console) -> None:
    """Print the single-run variant table and recommendation with rich.

    Args:
        report: a report dict from :func:`build_report` or :func:`load_report`.
        console: where to print.
    """
    from rich.table import Table
    from rich.text import Text

    summary = report.get("summary", {})
    recommended = summary.get("recommended")
    meta = " · ".join(f"{label}: {value}" for label, value in header_fields(report))
    table = Table(title=Text(f"Compression report: {report.get('run') or 'run'}"), caption=Text(meta))
    for i, col in enumerate(table_columns(report)):
        table.add_column(col, justify="right" if 2 <= i <= 9 or col == DECODE_COLUMN else "left")
    for v, row in zip(report.get("variants", []), table_rows(report)):
        is_rec = v.get("name") == recommended
        if is_rec:
            row = [f"★ {row[0]}"] + row[1:]
        table.add_row(*(Text(c) for c in row), style="bold green" if is_rec else None)
    console.print(table)
    if summary.get("recommendation"):
        console.print(Text.assemble(("Recommendation: ", "bold"), summary["recommendation"]))
    console.print(measurement_note(report), style="dim")
