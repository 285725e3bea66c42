"""Accuracy-vs-latency reports of compression runs (``report.json`` / ``.md`` / ``.html``).

rich and matplotlib are imported only inside the functions that draw or print.
"""

from __future__ import annotations

from dsk_compress.report.build import (
    DEFAULT_MAX_ACCURACY_DROP,
    REPORT_SCHEMA_VERSION,
    VARIANT_KEYS,
    build_report,
    compare_reports,
    comparison_rows,
    format_params,
    load_report,
    make_report,
    pareto_front,
    render_comparison,
    render_markdown,
    render_summary_table,
)

__all__ = [
    "DEFAULT_MAX_ACCURACY_DROP",
    "REPORT_SCHEMA_VERSION",
    "VARIANT_KEYS",
    "build_report",
    "compare_reports",
    "comparison_rows",
    "format_params",
    "load_report",
    "make_report",
    "pareto_front",
    "render_comparison",
    "render_markdown",
    "render_summary_table",
]
