"""Accuracy-vs-latency reports of compression runs (``report.json`` / ``.md`` / ``.html``).

- :mod:`~dsk_compress.report.model`: the typed, versioned ``report.json`` (load, validate, save).
- :mod:`~dsk_compress.report.build`: derived figures, Pareto front, recommendation; writes the files.
- :mod:`~dsk_compress.report.devices`: report rows from bench records, and the device sections read
  from ``RUN/devices/<name>/results.json`` (so the report can be rebuilt from files).
- renderers, each reading the model: :mod:`~dsk_compress.report.markdown`,
  :mod:`~dsk_compress.report.html` (page + Pareto PNG), :mod:`~dsk_compress.report.terminal`
  (rich tables); :mod:`~dsk_compress.report.format` holds the cells they share.

rich and matplotlib are imported only inside the functions that draw or print.
"""

from __future__ import annotations

from dsk_compress.report.build import DEFAULT_MAX_ACCURACY_DROP, build_report, make_report, pareto_front, rebuild_report
from dsk_compress.report.devices import device_results_path, record_row
from dsk_compress.report.format import format_params
from dsk_compress.report.markdown import render_markdown
from dsk_compress.report.model import (
    REPORT_SCHEMA_VERSION,
    VARIANT_KEYS,
    Report,
    compare_reports,
    load_report,
    read_report,
)
from dsk_compress.report.terminal import comparison_rows, render_comparison, render_summary_table

__all__ = [
    "DEFAULT_MAX_ACCURACY_DROP",
    "REPORT_SCHEMA_VERSION",
    "VARIANT_KEYS",
    "Report",
    "build_report",
    "compare_reports",
    "comparison_rows",
    "device_results_path",
    "format_params",
    "load_report",
    "make_report",
    "pareto_front",
    "read_report",
    "rebuild_report",
    "record_row",
    "render_comparison",
    "render_markdown",
    "render_summary_table",
]
