"""Number formatting and the variant table shared by the renderers (markdown, HTML, terminal).

Every function takes a :class:`~dsk_compress.report.model.Report` (or a report dict, which is
validated first) and returns plain strings, so the three renderers print the same cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsk_compress.report.model import DistillationMargin, Report, as_report, finite

DASH = "—"

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


def format_params(n: Any) -> str:
    """Human-readable parameter count: ``1234567`` -> ``"1.23M"``, ``None`` -> ``"—"``."""
    x = finite(n)
    if x is None:
        return DASH
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}"
    return str(int(x))


def format_size_mb(size_bytes: Any) -> str:
    """Bytes as megabytes (10^6 bytes) with 2 decimals, or ``"—"``."""
    x = finite(size_bytes)
    return DASH if x is None else f"{x / 1e6:.2f}"


def fmt(x: Any, decimals: int = 2, suffix: str = "") -> str:
    """``x`` with ``decimals`` decimals and ``suffix``, or ``"—"`` when it is not a finite number."""
    f = finite(x)
    return DASH if f is None else f"{f:.{decimals}f}{suffix}"


def host_str(host: Any) -> str:
    """The report's host as one string: a mapping's name / hostname / host, else all its items."""
    if host is None or host == "":
        return DASH
    if isinstance(host, Mapping):
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


def _has_decode(report: Report) -> bool:
    return any(finite(v.decode_tokens_per_s) is not None for v in report.variants)


def table_columns(report: Report | Mapping[str, Any]) -> tuple[str, ...]:
    """Column titles of ``report``'s table: :data:`TABLE_COLUMNS`, plus :data:`DECODE_COLUMN` when a variant has one."""
    return TABLE_COLUMNS + (DECODE_COLUMN,) if _has_decode(as_report(report)) else TABLE_COLUMNS


def numeric_columns(columns: tuple[str, ...]) -> set[int]:
    """Indices of the right-aligned (numeric) columns among ``columns``: Params to Size ratio, and decode."""
    return {i for i, c in enumerate(columns) if 2 <= i <= 9 or c == DECODE_COLUMN}


def table_rows(report: Report | Mapping[str, Any]) -> list[list[str]]:
    """Formatted cells (see :func:`table_columns`) of one row per variant of ``report``."""
    report = as_report(report)
    rows = []
    decode = _has_decode(report)
    for v in report.variants:
        rows.append(
            [
                str(v.name),
                str(v.role),
                format_params(v.params),
                format_size_mb(v.size_bytes),
                fmt(v.accuracy),
                fmt(v.bits_per_byte, 3),
                fmt(v.p50),
                fmt(v.p99),
                fmt(v.speedup_vs_teacher, 2, "×"),
                fmt(v.size_ratio_vs_teacher, 2, "×"),
                str(v.runtime or DASH),
            ]
        )
        if decode:  # a dash for variants without a KV-cache graph
            rows[-1].append(fmt(v.decode_tokens_per_s, 1))
    return rows


def header_fields(report: Report | Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` pairs for the report header: recipe, task, host, device, runtime."""
    report = as_report(report)
    return [
        ("Recipe", str(report.recipe or DASH)),
        ("Task", str(report.task or DASH)),
        ("Host", host_str(report.host)),
        ("Device", _unique([v.device for v in report.variants])),
        ("Runtime", _unique([v.runtime for v in report.variants])),
    ]


def measurement_note(report: Report | Mapping[str, Any]) -> str:
    """The sentence that says where and how latencies were measured."""
    host = host_str(as_report(report).host)
    where = "this host" if host == DASH else f"this host ({host})"
    return (
        f"All latencies were measured on {where} at batch size 1, "
        "with the runtime named in each row; sizes are artifact file sizes in MB (10^6 bytes)."
    )


def margin_text(m: DistillationMargin) -> str:
    """``student-distill`` 70.64% vs ``student-nokd`` 70.54%: +0.10 points"""
    return f"`{m.variant}` {m.accuracy:.2f}% vs `{m.baseline}` {m.baseline_accuracy:.2f}%: {m.margin:+.2f} points"


def title(report: Report) -> str:
    """``Compression report: <run>`` (``run`` when the report names none)."""
    return f"Compression report: {report.run or 'run'}"
