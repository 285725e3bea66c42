"""Self-contained HTML page and accuracy-vs-latency plots (the host's and one per device) for a run report.

The page has no external assets: CSS sits in a ``<style>`` block and the plot is an
embedded base64 PNG. matplotlib is imported inside :func:`render_pareto_png` and drawn
with the Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
from collections.abc import Mapping
from typing import Any

from dsk_compress.report.format import (
    device_note,
    has_detail,
    header_fields,
    host_str,
    margin_text,
    measurement_note,
    numeric_columns,
    table_columns,
    table_rows,
    title,
    variant_detail,
)
from dsk_compress.report.model import DeviceSection, Report, Variant, as_report, finite

_ROLE_COLOURS = {"teacher": "#6b7280", "student": "#2563eb", "final": "#dc2626", "final-int4": "#9333ea"}  # both QAT students stand out
_OTHER_COLOUR = "#0891b2"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 2rem auto; max-width: 1280px; color: #111827; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.5rem; }
ul.meta { list-style: none; padding: 0; color: #374151; }
ul.meta li { display: inline-block; margin-right: 1.5rem; }
div.table { overflow-x: auto; margin: 1rem 0; }  /* a wide table scrolls inside the page instead of running off it */
table { border-collapse: collapse; width: 100%; font-size: 0.8rem; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 0.3rem 0.45rem; text-align: left; }
td { white-space: nowrap; }  /* one line per variant: names and ranges never break */
th { background: #f3f4f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.recommended td { background: #ecfdf5; font-weight: 600; }
tr.pareto td:first-child::after { content: " \\25C6"; color: #059669; }
.rec { background: #f0fdf4; border-left: 4px solid #16a34a; padding: 0.6rem 1rem; }
.note { color: #6b7280; font-size: 0.85rem; }
img.plot { max-width: 100%; border: 1px solid #e5e7eb; }
code { background: #f3f4f6; padding: 0 0.2rem; border-radius: 3px; }
"""


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _esc_code(text: str) -> str:
    """Escape ``text`` and turn `backticked` spans into ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))


PARETO_PNG = "pareto.png"


def plot_name(section: str | None) -> str:
    """The PNG file of a section's plot: ``pareto.png`` for the host, ``pareto-<device>.png`` for a device."""
    if section is None:
        return PARETO_PNG
    return "pareto-" + re.sub(r"[^A-Za-z0-9._-]+", "_", section) + ".png"


def render_pareto_png(report: Report | Mapping[str, Any], section: DeviceSection | None = None) -> bytes:
    """Draw accuracy vs p50 latency for the report's host rows (or one device section's rows) and return PNG bytes.

    Each point is labelled with the variant name; the Pareto front (lowest latency, highest accuracy) is
    drawn as a step line. The x axis is logarithmic when every latency is positive. Variants without a
    p50 latency or an accuracy are left out (they are never on the front).

    Args:
        report: a report from :func:`dsk_compress.report.build_report` (model or dict).
        section: a device section of ``report``; None for the host rows.

    Returns:
        The PNG image.
    """
    report = as_report(report)
    if section is None:
        rows = report.variants
        recommended = report.summary.recommended if report.summary else None
        pareto = set(report.summary.pareto) if report.summary else set()
        where = f"host {host_str(report.host)}" if report.devices else ""
    else:
        rows, recommended, pareto, where = section.variants, None, set(section.pareto), section.label
    return _plot(rows, recommended, pareto, where)


def spread_labels(fig, labels: list, step: float = 9, tries: int = 12) -> list:
    """Move each label (in order) down, then up, by ``step`` points until its box overlaps no earlier one; returns the boxes.

    The crowding guess above works in data units; text widths are only known once drawn, so this pass measures them."""
    renderer = fig.canvas.get_renderer()
    boxes: list = []
    for a in labels:
        x0, y0 = a.xyann
        for k in range(tries * 2 + 1):
            dy = step * ((k + 1) // 2) * (-1 if k % 2 else 1)
            a.xyann = (x0, y0 + dy)
            box = a.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in boxes):
                break
        boxes.append(box)
    return boxes


def _plot(rows: list[Variant], recommended: str | None, pareto: set[str], where: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    pts = [(v, v.p50, finite(v.accuracy)) for v in rows]
    pts = [(v, x, y) for v, x, y in pts if x is not None and y is not None]

    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if not pts:
        ax.text(0.5, 0.5, "no variant has both a latency and an accuracy", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        front = [i for i, (v, _, _) in enumerate(pts) if v.name in pareto]
        fx = sorted((pts[i][1], pts[i][2]) for i in front)
        if len(fx) > 1:
            ax.step(
                [p[0] for p in fx],
                [p[1] for p in fx],
                where="post",
                color="#059669",
                linewidth=1.5,
                alpha=0.8,
                label="Pareto front",
                zorder=1,
            )
        ys = [y for _, _, y in pts]
        near_y = 0.05 * max(max(ys) - min(ys), 1e-9)
        placed: list[tuple[float, float]] = []
        labels: list = []
        for i, (v, x, y) in sorted(enumerate(pts), key=lambda t: -t[1][2]):  # top down, so crowded labels step downwards
            colour = _ROLE_COLOURS.get(str(v.role), _OTHER_COLOUR)
            on_front = i in front
            ax.scatter(
                [x],
                [y],
                s=70 if on_front else 45,
                color=colour,
                zorder=3,
                marker="D" if on_front else "o",
                edgecolors="black" if v.name == recommended else "none",
                linewidths=1.2,
            )
            label = v.name.replace("$", r"\$")
            # a label near an earlier one (close in log latency and accuracy) steps down a line so they do not overprint
            crowd = sum(1 for px, py in placed if abs(math.log10(max(x, 1e-9) / max(px, 1e-9))) < 0.08 and abs(y - py) < near_y)
            placed.append((x, y))
            labels.append(ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5 - 10 * crowd), fontsize=8))
        if all(x > 0 for _, x, _ in pts):
            ax.set_xscale("log")
            xs = [x for _, x, _ in pts]
            lo, hi = min(xs), max(xs)
            ax.set_xlim(lo / 1.6, hi * 1.8)  # room for the labels
            plain = FuncFormatter(lambda val, _pos: f"{val:g}")
            ax.xaxis.set_major_formatter(plain)
            if hi / lo < 30:  # few decades: label minor ticks too, else they crowd
                ax.xaxis.set_minor_formatter(plain)
                ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("p50 latency, ms (batch 1" + (", log scale)" if ax.get_xscale() == "log" else ")"))
        ax.set_ylabel("accuracy, %")
        ax.grid(True, which="both", alpha=0.25)
        title = "Accuracy vs latency  (◆ Pareto-optimal" + (", outlined = recommended)" if recommended else ")")
        ax.set_title(f"{textwrap.shorten(where, 90, placeholder=' ...')}\n{title}" if where else title, fontsize=9)
        spread_labels(fig, labels)
        if len(fx) > 1:
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<p><img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{b64}"></p>'


def _table(rows: list[Variant], recommended: str | None, pareto: set[str], device: bool = False) -> list[str]:
    cols = table_columns(rows, device)
    numeric = numeric_columns(cols)
    out = [
        '<div class="table"><table>',
        "<thead><tr>"
        + "".join(f'<th class="num">{_esc(c)}</th>' if i in numeric else f"<th>{_esc(c)}</th>" for i, c in enumerate(cols))
        + "</tr></thead>",
        "<tbody>",
    ]
    for v, row in zip(rows, table_rows(rows, device)):
        classes = [c for c, on in (("recommended", v.name == recommended), ("pareto", v.name in pareto)) if on]
        cls = f' class="{" ".join(classes)}"' if classes else ""
        cells = "".join(f'<td class="num">{_esc(c)}</td>' if i in numeric else f"<td>{_esc(c)}</td>" for i, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    return out + ["</tbody></table></div>"]


def render_html(report: Report | Mapping[str, Any]) -> tuple[str, dict[str, bytes]]:
    """Render ``report.html`` as one self-contained page: the host's table and plot, then a table and a plot per device.

    Args:
        report: a report from :func:`dsk_compress.report.build_report` (model or dict).

    Returns:
        ``(page, pngs)``: the HTML text and the PNG bytes of each plot embedded in it by file name
        (``pareto.png`` for the host, ``pareto-<device>.png`` per device; ``build_report`` writes them too).
    """
    report = as_report(report)
    summary = report.summary
    recommended = summary.recommended if summary else None
    pareto = set(summary.pareto) if summary else set()
    heading = title(report)
    pngs = {PARETO_PNG: render_pareto_png(report)}

    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{_esc(heading)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_esc(heading)}</h1>",
        '<ul class="meta">',
    ]
    for label, value in header_fields(report):
        out.append(f"<li><strong>{_esc(label)}:</strong> {_esc(value)}</li>")
    if report.created:
        out.append(f"<li><strong>Created:</strong> {_esc(report.created)}</li>")
    out.append("</ul>")
    out.append('<section class="device" data-device="host">')
    if report.devices:
        out.append(f"<h2>Host: {_esc(host_str(report.host))}</h2>")
    out += _table(report.variants, recommended, pareto) if report.variants else ["<p><em>No variants were measured.</em></p>"]
    details = [v for v in report.variants if has_detail(v)]
    if details:
        items = "".join(f"<li><code>{_esc(v.name)}</code>: {_esc_code(variant_detail(v))}</li>" for v in details)
        out.append(f'<details class="variants" open><summary>Variants: notes, fused operators, decode</summary><ul>{items}</ul></details>')
    if summary is not None and summary.recommendation:
        out.append(f'<p class="rec"><strong>Recommendation:</strong> {_esc_code(summary.recommendation)}</p>')
    if summary is not None and summary.distillation:
        items = "".join(f"<li>{_esc(m.compares)}: {_esc_code(margin_text(m))}</li>" for m in summary.distillation)
        out.append(f"<p><strong>Distillation</strong> (same token budget, accuracy measured on the exported models):</p><ul>{items}</ul>")
    out.append(_img(pngs[PARETO_PNG], "accuracy vs p50 latency on the host"))
    out.append(f'<p class="note">{_esc(measurement_note(report))} ◆ marks Pareto-optimal variants.</p>')
    out.append("</section>")
    for d in report.devices:
        png = pngs[plot_name(d.name)] = render_pareto_png(report, d)
        out.append(f'<section class="device" data-device="{_esc(d.name)}">')
        out.append(f"<h2>Device: {_esc(d.label)}</h2>")
        out += _table(d.variants, None, set(d.pareto), device=True)
        out.append(_img(png, f"accuracy vs p50 latency on {d.label}"))
        out.append(f'<p class="note">{_esc(device_note(d))}</p>')
        out.append("</section>")
    out.append("</body>")
    out.append("</html>")
    return "\n".join(out) + "\n", pngs
