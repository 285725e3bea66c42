"""Reports in the terminal: one run's tables (the host's, then each device's), and several runs side by side (rich tables).

rich is imported inside the functions that print, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsk_compress.report.format import (
    COLUMN_KEYS,
    DASH,
    SHORT_TITLES,
    SUMMARY_KEYS,
    device_note,
    fmt,
    header_fields,
    host_str,
    measurement_note,
    numeric_columns,
    summary_columns,
    table_columns,
    table_rows,
    title,
)
from dsk_compress.report.model import HOST, Report, as_report, finite

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console


def comparison_rows(reports: Sequence[Report | Mapping[str, Any]]) -> list[dict]:
    """One flat row per (run, place, variant): run, measured_on, variant, role, accuracy, p50_ms, size_mb, speedup,
    recommended. The host's rows come first, then each device section's; ``measured_on`` says where."""
    rows = []
    for rep in map(as_report, reports):
        run = rep.run or Path(rep.run_dir or "").name or DASH
        recommended = rep.summary.recommended if rep.summary else None
        sections = [(None, rep.variants)] + [(d, d.variants) for d in rep.devices]
        for d, variants in sections:
            for v in variants:
                size = finite(v.size_bytes)
                rows.append(
                    {
                        "run": str(run),
                        "measured_on": v.measured_on or (f"host {host_str(rep.host)}" if d is None else d.label),
                        "device": HOST if d is None else d.name,
                        "variant": v.name,
                        "role": v.role,
                        "accuracy": finite(v.accuracy),
                        "p50_ms": v.p50,
                        "size_mb": None if size is None else size / 1e6,
                        "speedup": finite(v.speedup_vs_teacher),
                        "recommended": d is None and v.name == recommended,
                    }
                )
    return rows


def render_comparison(reports: Sequence[Report | Mapping[str, Any]], console: Console) -> None:
    """Print a rich table comparing several runs and the devices each was measured on, one row per (run, place, variant).

    Args:
        reports: reports, e.g. from :func:`dsk_compress.report.compare_reports`.
        console: where to print.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    rows = comparison_rows(reports)
    names = [f"★ {r['variant']}" if r["recommended"] else str(r["variant"]) for r in rows]
    table = Table(
        title="Run comparison",
        caption="★ recommended variant of its run; latencies at batch 1 where each row says",
        box=box.SIMPLE_HEAD,
        caption_justify="left",
        pad_edge=False,
    )
    # as in the summary table: variant names whole, everything else folds instead of ending in "…"
    table.add_column("Run", style="cyan", overflow="fold")
    table.add_column("Measured on", overflow="fold")
    table.add_column("Variant", overflow="fold", min_width=max([len("Variant"), *map(len, names)]))
    table.add_column("Accuracy %", justify="right", overflow="fold")
    table.add_column("p50 ms", justify="right", overflow="fold")
    table.add_column("MB", justify="right", overflow="fold")
    table.add_column("Speedup", justify="right", overflow="fold")
    last = None
    for row, name in zip(rows, names):
        if last is not None and (row["run"], row["device"]) != last:
            table.add_section()
        last = (row["run"], row["device"])
        cells = [
            row["run"],
            str(row["measured_on"]),
            name,
            fmt(row["accuracy"]),
            fmt(row["p50_ms"]),
            fmt(row["size_mb"]),
            fmt(row["speedup"], 2, "×"),
        ]
        # Text cells: names such as "student[kd]" must not be parsed as rich markup.
        table.add_row(*(Text(c) for c in cells), style="bold green" if row["recommended"] else None)
    console.print(table)


def _print_table(console: Console, heading, caption, rows, device: bool, recommended: str | None, columns) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    wide = columns == "wide"
    cols = table_columns(rows, device) if wide else summary_columns(rows, device, columns)
    numeric = numeric_columns(cols)
    cells = table_rows(rows, device, cols)
    for v, row in zip(rows, cells):
        if v.name == recommended:
            row[0] = f"★ {row[0]}"
    # Names are never cut: the variant column is as wide as its longest name; the numbers beside it fold rather than
    # end in "…" when a terminal is too narrow for them (the summary fits 100 columns).
    table = Table(title=heading, caption=caption, box=box.SIMPLE_HEAD, caption_justify="left", pad_edge=False)
    for i, col in enumerate(cols):
        title = col if wide else SHORT_TITLES.get(col, col)
        width = max([len(title), *(len(r[i]) for r in cells)]) if col == "Variant" else None
        table.add_column(title, justify="right" if i in numeric else "left", overflow="fold", min_width=width)
    for v, row in zip(rows, cells):
        # Text cells: names such as "student[kd]" must not be parsed as rich markup.
        table.add_row(*(Text(c) for c in row), style="bold green" if v.name == recommended else None)
    console.print(table)


def render_summary_table(report: Report | Mapping[str, Any], console: Console, columns: str | tuple[str, ...] | None = None) -> None:
    """Print the host's variant table and recommendation, then one table per device, with rich.

    Args:
        report: a report from :func:`dsk_compress.report.build_report` or :func:`dsk_compress.report.load_report`.
        console: where to print.
        columns: None for the summary table (:data:`~dsk_compress.report.format.SUMMARY_KEYS`: fits 100 columns),
            ``"wide"`` for every column, or column keys (:func:`~dsk_compress.report.format.parse_columns`).
    """
    from rich.text import Text

    report = as_report(report)
    summary = report.summary
    meta = " · ".join(f"{label}: {value}" for label, value in header_fields(report))
    heading = title(report) + (f" — host {host_str(report.host)}" if report.devices else "")
    _print_table(console, Text(heading), Text(meta), report.variants, False, summary.recommended if summary else None, columns)
    if summary is not None and summary.recommendation:
        console.print(Text.assemble(("Recommendation: ", "bold"), summary.recommendation))
    console.print(measurement_note(report), style="dim", markup=False)
    for d in report.devices:
        _print_table(console, Text(f"Device: {d.label}"), Text(device_note(d)), d.variants, True, None, columns)
    if columns is None:
        console.print(
            "Every column: dsk-compress report RUN_DIR --wide; or choose them with --columns "
            f"{','.join(SUMMARY_KEYS[:4])},p99 (any of: {', '.join(COLUMN_KEYS)}).",
            style="dim",
            markup=False,
        )
