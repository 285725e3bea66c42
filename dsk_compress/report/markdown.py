"""``report.md``: the report as a Markdown page: header, the summary table (the terminal's columns), recommendation,
Pareto front and distillation margins, then every column, the variants' details and one section per device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsk_compress.report.format import (
    SHORT_TITLES,
    device_note,
    has_detail,
    header_fields,
    host_str,
    margin_text,
    measurement_note,
    numeric_columns,
    summary_columns,
    table_columns,
    table_rows,
    title,
    variant_detail,
)
from dsk_compress.report.model import Report, Variant, as_report


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Variant], device: bool = False, summary: bool = False) -> list[str]:
    """The summary table (the terminal's columns and titles) or, without ``summary``, every column."""
    cols = summary_columns(rows, device) if summary else table_columns(rows, device)
    titles = [SHORT_TITLES.get(c, c) for c in cols] if summary else list(cols)
    numeric = numeric_columns(cols)
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---:" if i in numeric else "---" for i in range(len(cols))) + "|"]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table_rows(rows, device, cols)]


def render_markdown(report: Report | Mapping[str, Any]) -> str:
    """Render ``report.md``: title, header, the host's variant table, recommendation and measurement note, then one
    section per device (its table, Pareto front and what its numbers are)."""
    report = as_report(report)
    lines = [f"# {title(report)}", ""]
    for label, value in header_fields(report):
        lines.append(f"- **{label}:** {value}")
    if report.created:
        lines.append(f"- **Created:** {report.created}")
    lines.append("")
    if report.devices:
        lines += [f"## Host: {host_str(report.host)}", ""]
    lines += _table(report.variants, summary=True) if report.variants else ["_No variants were measured._"]
    lines.append("")
    summary = report.summary
    if summary is not None and summary.recommendation:
        lines.append(f"**Recommendation:** {summary.recommendation}")
        lines.append("")
    if summary is not None and summary.pareto:
        lines.append("**Pareto-optimal (p50 latency vs accuracy):** " + ", ".join(f"`{n}`" for n in summary.pareto))
        lines.append("")
    if summary is not None and summary.distillation:
        lines.append("**Distillation (same token budget, accuracy measured on the exported models):**")
        lines += [f"- {m.compares}: {margin_text(m)}" for m in summary.distillation]
        lines.append("")
    if report.variants:
        lines += ["**All columns:**", ""] + _table(report.variants) + [""]
    notes = [v for v in report.variants if has_detail(v)]
    if notes:
        lines.append("**Variants:**")
        lines += [f"- `{v.name}`: {variant_detail(v)}" for v in notes]
        lines.append("")
    lines.append(f"_{measurement_note(report)}_")
    for d in report.devices:
        lines += ["", f"## Device: {d.label}", ""]
        lines += _table(d.variants, device=True, summary=True) + ["", "**All columns:**", ""]
        lines += _table(d.variants, device=True)
        lines.append("")
        if d.pareto:
            lines += ["**Pareto-optimal on this device:** " + ", ".join(f"`{n}`" for n in d.pareto), ""]
        lines.append(f"_{device_note(d)}_")
    return "\n".join(lines) + "\n"
