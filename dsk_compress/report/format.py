"""Number formatting and the variant table shared by the renderers (markdown, HTML, terminal).

Every function takes a :class:`~dsk_compress.report.model.Report` (or a report dict, which is
validated first) and returns plain strings, so the three renderers print the same cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsk_compress.report.model import HOST, DeviceSection, DistillationMargin, Report, Variant, as_report, finite

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
"""The host table's columns (a report of version 1 has exactly these, plus :data:`DECODE_COLUMN`)."""

DEVICE_COLUMNS = ("Variant", "Role", "Params", "Size (MB)", "Accuracy (%)", "Bits/byte", "p50 (ms)", "p99 (ms)", "Δ vs host", "Runtime")
"""A device section's columns: the accuracy difference to the host's row of the same variant instead of the teacher ratios
(the teacher is rarely measured on a device)."""

MEASURED_ON_COLUMN = "Measured on"
"""Inserted before Runtime when rows say where they were measured (reports of version 2)."""

THROUGHPUT_COLUMN = "Items/s (b1/b8/b64)"
"""Appended when a row was measured at more than one batch size: items/s per batch size, a dash where skipped."""

P50_RANGE_COLUMN = "p50 range (ms)"
"""Inserted after p50 when rows were timed in several interleaved rounds: the lowest and highest round p50 (p50 is their
median)."""

DECODE_COLUMN = "Decode (tok/s)"
"""Appended to the table when a variant has ``decode_tokens_per_s`` (greedy decode with its KV-cache graph)."""

THROUGHPUT_BATCHES = ("1", "8", "64")

COLUMN_KEYS = {
    "variant": "Variant",
    "role": "Role",
    "params": "Params",
    "size": "Size (MB)",
    "accuracy": "Accuracy (%)",
    "bits-per-byte": "Bits/byte",
    "p50": "p50 (ms)",
    "p99": "p99 (ms)",
    "p50-range": P50_RANGE_COLUMN,
    "speedup": "Speedup",
    "size-ratio": "Size ratio",
    "delta-vs-host": "Δ vs host",
    "measured-on": MEASURED_ON_COLUMN,
    "runtime": "Runtime",
    "throughput": THROUGHPUT_COLUMN,
    "decode": DECODE_COLUMN,
}
"""Every column by the name ``dsk-compress report --columns`` takes."""

SUMMARY_KEYS = ("variant", "params", "size", "accuracy", "p50", "speedup", "decode")
"""The summary table's columns (terminal and the top of report.md): one line per row in a 100-column terminal with
variant names of up to 34 characters (the default run's longest is 24); with longer ones other cells fold, none is cut.
A column no row has a value for (decode, say) is left out."""

DEVICE_SUMMARY_KEYS = ("variant", "params", "size", "accuracy", "p50", "delta-vs-host", "decode")
"""A device section's summary columns: the accuracy difference to the host's row instead of the speed-up."""

SHORT_TITLES = {"Size (MB)": "MB", "Accuracy (%)": "Accuracy %", "p50 (ms)": "p50 ms", "p99 (ms)": "p99 ms", DECODE_COLUMN: "Decode tok/s"}
"""Column titles in the summary table (narrower; the full table and report.md's "All columns" keep the long ones)."""


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


def _variants(report_or_rows) -> list[Variant]:
    if isinstance(report_or_rows, list):
        return report_or_rows
    return as_report(report_or_rows).variants


def table_columns(rows: Report | Mapping[str, Any] | list[Variant], device: bool = False) -> tuple[str, ...]:
    """Column titles of a table of ``rows`` (a report's host rows, or a device section's rows with ``device``):
    :data:`TABLE_COLUMNS` (or :data:`DEVICE_COLUMNS`), with :data:`MEASURED_ON_COLUMN` before Runtime when rows say
    where they were measured, :data:`P50_RANGE_COLUMN` after p50 when rows were timed in rounds, then
    :data:`THROUGHPUT_COLUMN` and :data:`DECODE_COLUMN` when a row has them."""
    vs = _variants(rows)
    cols = list(DEVICE_COLUMNS if device else TABLE_COLUMNS)
    if any(v.measured_on for v in vs):
        cols.insert(cols.index("Runtime"), MEASURED_ON_COLUMN)
    if any(_p50_rounds(v) for v in vs):
        cols.insert(cols.index("p50 (ms)") + 1, P50_RANGE_COLUMN)
    if any(v.throughput_by_batch and len(v.throughput_by_batch) > 1 for v in vs):
        cols.append(THROUGHPUT_COLUMN)
    if any(finite(v.decode_tokens_per_s) is not None for v in vs):
        cols.append(DECODE_COLUMN)
    return tuple(cols)


def parse_columns(text: str) -> tuple[str, ...]:
    """``"variant,accuracy,p99"`` as column keys (see :data:`COLUMN_KEYS`); the variant column always comes first.

    Raises:
        RunError: a name that is not a column, naming the valid ones.
    """
    from dsk_compress.errors import RunError

    keys = [k.strip().lower() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in COLUMN_KEYS]
    if unknown or not keys:
        raise RunError(
            f"--columns {text!r}: unknown column {', '.join(map(repr, unknown)) or '(none given)'}",
            hint=f"choose from {', '.join(COLUMN_KEYS)}",
        )
    return tuple(dict.fromkeys(["variant", *keys]))


def summary_columns(
    rows: Report | Mapping[str, Any] | list[Variant], device: bool = False, keys: tuple[str, ...] | None = None
) -> tuple[str, ...]:
    """Column titles of the summary table of ``rows``: ``keys`` (default :data:`SUMMARY_KEYS`, or
    :data:`DEVICE_SUMMARY_KEYS` with ``device``) that :func:`table_columns` has for these rows, in the order given."""
    present = set(table_columns(rows, device))
    keys = keys or (DEVICE_SUMMARY_KEYS if device else SUMMARY_KEYS)
    return tuple(COLUMN_KEYS[k] for k in keys if COLUMN_KEYS[k] in present)


def numeric_columns(columns: tuple[str, ...]) -> set[int]:
    """Indices of the right-aligned (numeric) columns among ``columns``."""
    text = {"Variant", "Role", "Runtime", MEASURED_ON_COLUMN}
    return {i for i, c in enumerate(columns) if c not in text}


def _p50_rounds(v: Variant) -> list[float]:
    rounds = getattr(v.latency_ms, "p50_rounds", None) if v.latency_ms else None
    return [x for x in rounds if finite(x) is not None] if isinstance(rounds, list) and len(rounds) > 1 else []


def _p50_range(v: Variant) -> str:
    r = _p50_rounds(v)
    return f"{fmt(min(r))}–{fmt(max(r))}" if r else DASH


def _throughput(v: Variant) -> str:
    t = v.throughput_by_batch or {}
    return "/".join(fmt(t.get(b), 0) for b in THROUGHPUT_BATCHES)


_CELLS = {
    "Variant": lambda v: str(v.name),
    "Role": lambda v: str(v.role),
    "Params": lambda v: format_params(v.params),
    "Size (MB)": lambda v: format_size_mb(v.size_bytes),
    "Accuracy (%)": lambda v: fmt(v.accuracy),
    "Bits/byte": lambda v: fmt(v.bits_per_byte, 3),
    "p50 (ms)": lambda v: fmt(v.p50),
    "p99 (ms)": lambda v: fmt(v.p99),
    P50_RANGE_COLUMN: _p50_range,
    "Speedup": lambda v: fmt(v.speedup_vs_teacher, 2, "×"),
    "Size ratio": lambda v: fmt(v.size_ratio_vs_teacher, 2, "×"),
    "Δ vs host": lambda v: DASH if finite(v.accuracy_delta_vs_host) is None else f"{v.accuracy_delta_vs_host:+.3f}",
    "Runtime": lambda v: str(v.runtime or DASH),
    MEASURED_ON_COLUMN: lambda v: str(v.measured_on or DASH),
    THROUGHPUT_COLUMN: _throughput,
    DECODE_COLUMN: lambda v: fmt(v.decode_tokens_per_s, 1),  # a dash for variants without a KV-cache graph
}


def table_rows(
    rows: Report | Mapping[str, Any] | list[Variant], device: bool = False, columns: tuple[str, ...] | None = None
) -> list[list[str]]:
    """Formatted cells of one row per variant, in ``columns`` (column titles; default :func:`table_columns`)."""
    vs = _variants(rows)
    cols = columns or table_columns(vs, device)
    return [[_CELLS[c](v) for c in cols] for v in vs]


def header_fields(report: Report | Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` pairs for the report header: recipe, task, host, runtime (of the host rows), devices."""
    report = as_report(report)
    fields = [
        ("Recipe", str(report.recipe or DASH)),
        ("Task", str(report.task or DASH)),
        ("Host", host_str(report.host)),
    ]
    legacy = [v.device for v in report.variants if v.device not in (None, HOST)]
    if legacy and not report.devices:  # a version-1 report: the bench stage's profile label
        fields.append(("Device", _unique(legacy)))
    fields.append(("Runtime", _unique([v.runtime for v in report.variants])))
    if report.devices:
        fields.append(("Devices", ", ".join(d.label for d in report.devices)))
    return fields


def measurement_note(report: Report | Mapping[str, Any]) -> str:
    """The sentence that says where and how the host rows' latencies were measured."""
    host = host_str(as_report(report).host)
    where = "this host" if host == DASH else f"this host ({host})"
    return (
        f"All latencies were measured on {where} at batch size 1, "
        "with the runtime named in each row; sizes are artifact file sizes in MB (10^6 bytes)."
    )


def device_note(section: DeviceSection) -> str:
    """What a device section's numbers are: where they were measured, how, and what an emulated row means."""
    what = [x for x in (section.machine, section.cpu, section.gpu, section.os, section.python and f"Python {section.python}") if x]
    if section.measurement == "emulated":
        how = (
            f"Emulated: an {section.machine or 'emulated'} Python under QEMU user mode on another machine. Accuracy is that of "
            "the artifact on this instruction set; timings are the emulator's, not the device's."
        )
    else:
        how = f"Measured on {section.where or section.name}."
    by = {"run.py": "the bundle's run.py", "bench_worker": "the bench worker"}
    tools = ", ".join(by.get(t.strip(), t.strip()) for t in (section.tool or "").split(",") if t.strip()) or "dsk-compress"
    return (
        f"{how} {', '.join(what)}. Runtime: {section.runtime or DASH}. Latencies at batch size 1, measured by {tools}; "
        f"from {section.results}" + (f", {section.measured_at}." if section.measured_at else ".")
    )


def margin_text(m: DistillationMargin) -> str:
    """``student-distill`` 70.64% vs ``student-nokd`` 70.54%: +0.10 points"""
    return f"`{m.variant}` {m.accuracy:.2f}% vs `{m.baseline}` {m.baseline_accuracy:.2f}%: {m.margin:+.2f} points"


def title(report: Report) -> str:
    """``Compression report: <run>`` (``run`` when the report names none)."""
    return f"Compression report: {report.run or 'run'}"


def _has_decode(v: Variant) -> bool:
    return v.decode is not None and bool(v.decode.model_fields_set)  # an empty ``decode: {}`` says nothing


def _ops(ops: dict[str, int] | None) -> str:
    return ", ".join(f"{k} x{n}" for k, n in ops.items()) if ops else ""


def variant_detail(v: Variant) -> str:
    """Notes, precision, fused operators, peak memory and decode figures of one variant, ``; ``-separated."""
    mem = f"peak RSS {v.peak_memory_mb:.0f} MB" if v.peak_memory_mb else ""
    fused = f"fused ops: {_ops(v.fused_ops)}" if v.fused_ops else ""
    dec = v.decode if _has_decode(v) else None
    dec_text = ""
    if dec is not None:
        prompt = "?" if dec.prompt_tokens is None else dec.prompt_tokens
        graph = f" with `{dec.artifact}`" if dec.artifact else ""
        dec_text = (
            f"greedy decode{graph} {fmt(dec.decode_ms_p50, 3)} ms/token p50, prefill of "
            f"{prompt} tokens {fmt(dec.prefill_ms, 2)} ms" + (f" (decoder ops: {_ops(dec.fused_ops)})" if dec.fused_ops else "")
        )
    return "; ".join(x for x in (v.notes or "", v.precision or "", fused, mem, dec_text) if x)


def has_detail(v: Variant) -> bool:
    """True when :func:`variant_detail` has something to say beyond the table."""
    return bool(v.notes or v.peak_memory_mb or v.fused_ops or _has_decode(v))
