"""Report rows from bench records, and the report's device sections read from ``RUN/devices/<name>/results.json``.

A :class:`~dsk_compress.runtimes.result.BenchRecord` is what was measured (the bench stage on the host,
``dsk-compress bench`` on a device or another machine). :func:`record_row` turns one into a report row;
:func:`device_sections` builds one :class:`~dsk_compress.report.model.DeviceSection` per results file, so
the report can be rebuilt from the files alone. A device row takes from the host's row of the same
variant only what the device cannot know (role, stage, parameter count) and the host's accuracy, to show
the difference; every measured number in it comes from the device's record.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsk_compress.report.model import HOST, DeviceSection, Variant, finite
from dsk_compress.report.pareto import pareto_front

if TYPE_CHECKING:  # pragma: no cover
    from dsk_compress.runtimes.result import BenchRecord

DEVICES_DIR = "devices"
RESULTS_JSON = "results.json"


def device_results_path(run_dir: str | Path, device: str) -> Path:
    """``RUN/devices/<device>/results.json``."""
    return Path(run_dir) / DEVICES_DIR / device / RESULTS_JSON


def _round(x: Any, n: int) -> Any:
    return None if x is None else round(x, n)


def record_row(
    rec: BenchRecord, name: str | None = None, base: dict | None = None, device: str = HOST, measured_on: str | None = None
) -> dict:
    """The report row (a :class:`~dsk_compress.report.model.Variant` dict) of one bench record.

    Args:
        rec: the record.
        name: the row's name (default the record's variant).
        base: what the device cannot measure: ``role``, ``stage``, ``params``, ``size_bytes``, ``artifact``,
            ``notes``, ``fused_ops`` (the host's artifact entry or row of the same variant).
        device: ``"host"`` for the run's host, else the device section's name.
        measured_on: the "Measured on" cell (default: the record's hostname, or SSH host, or "emulated").
    """
    base = base or {}
    lat = rec.timing.batches[0] if rec.timing else None
    metrics = dict(rec.accuracy.metrics) if rec.accuracy else {}
    p = rec.provenance
    where = measured_on or ("emulated" if p.measurement == "emulated" else (p.ssh_host or p.hostname))
    row = {
        "name": name or rec.variant,
        "role": rec.role or base.get("role"),
        "stage": base.get("stage", rec.variant),
        "params": base.get("params"),
        "size_bytes": rec.size_bytes if rec.size_bytes is not None else base.get("size_bytes"),
        "accuracy": _round(metrics.get("accuracy"), 3),
        "bits_per_byte": _round(metrics.get("bits_per_byte"), 4),
        "metrics": {k: round(v, 4) for k, v in metrics.items()} or None,
        "latency_ms": (
            {k: round(getattr(lat, k), 3) for k in ("p50", "p90", "p99", "mean")}
            | ({"p50_rounds": [round(x, 3) for x in lat.p50_rounds]} if lat.p50_rounds else {})
        )
        if lat
        else None,
        "throughput": round(lat.items_per_s, 2) if lat else None,
        "peak_memory_mb": _round(rec.memory.peak_rss_mb, 1),
        "runtime": rec.runtime.short,
        "device": device,
        "precision": rec.precision or base.get("precision"),
        "artifact": base.get("artifact", rec.artifact),
        "notes": base.get("notes", rec.notes),
        "measured_on": where,
        "measurement": p.measurement,
        "throughput_by_batch": {str(b.batch_size): round(b.items_per_s, 2) for b in rec.timing.batches} if rec.timing else None,
        "session_ms": _round(rec.timing.session_ms, 1) if rec.timing else None,
        "first_inference_ms": _round(rec.timing.first_inference_ms, 3) if rec.timing else None,
    }
    if base.get("fused_ops"):  # what the artifact runs, whoever measured it
        row["fused_ops"] = base["fused_ops"]
    if rec.decode is not None and rec.decode.decode_tokens_per_s is not None:
        d = rec.decode
        row["decode_tokens_per_s"] = d.decode_tokens_per_s
        row["decode"] = {k: v for k, v in d.model_dump(exclude={"tokens", "text", "execution_provider"}).items() if v is not None}
    return row


def row_names(records: list[BenchRecord]) -> list[str]:
    """One unique row name per record: the variant, and ``variant [runtime]`` for its second and later runtimes."""
    seen: dict[str, int] = {}
    names = []
    for r in records:
        n = seen[r.variant] = seen.get(r.variant, 0) + 1
        names.append(r.variant if n == 1 else f"{r.variant} [{r.runtime.short}]")
    return names


def section(name: str, records: list[BenchRecord], host_rows: list[Variant], results: str) -> DeviceSection:
    """The device section of ``records`` measured on device ``name`` (rows compared with ``host_rows``)."""
    host = {v.name: v for v in host_rows}
    rows = []
    for rec, row_name in zip(records, row_names(records)):
        h = host.get(rec.variant)
        base = h.model_dump(include={"role", "stage", "params", "artifact", "notes", "precision"}) if h else {}
        p = rec.provenance
        label = "emulated" if p.measurement == "emulated" else (p.ssh_host or p.hostname or name)
        v = Variant.model_validate(record_row(rec, row_name, base, device=name, measured_on=name if label == name else f"{name} ({label})"))
        acc, hacc = finite(v.accuracy), finite(h.accuracy) if h else None
        if acc is not None and hacc is not None:
            v = v.model_copy(update={"accuracy_delta_vs_host": round(acc - hacc, 4)})
        rows.append(v)
    latest = records[-1].provenance if records else None
    runtimes = list(dict.fromkeys(r.runtime.label for r in records))
    front = pareto_front([(v.p50, finite(v.accuracy)) for v in rows])
    return DeviceSection(
        name=name,
        measurement="emulated" if any(r.provenance.measurement == "emulated" for r in records) else "measured",
        where=(latest.ssh_host or latest.hostname) if latest else None,
        machine=latest.machine if latest else None,
        cpu=latest.cpu if latest else None,
        gpu=latest.gpu if latest else None,
        os=latest.os if latest else None,
        python=latest.python if latest else None,
        runtime=", ".join(runtimes) or None,
        measured_at=max((r.provenance.created or "" for r in records), default=None) or None,
        tool=", ".join(dict.fromkeys(r.provenance.tool for r in records)) or None,
        results=results,
        variants=rows,
        pareto=[rows[i].name for i in front],
    )


def device_sections(run_dir: str | Path, host_rows: list[Variant]) -> list[DeviceSection]:
    """A section per ``RUN/devices/*/results.json`` (sorted by device name) that holds at least one record."""
    from dsk_compress.runtimes.result import read_device_results

    run_dir = Path(run_dir)
    out = []
    for path in sorted((run_dir / DEVICES_DIR).glob(f"*/{RESULTS_JSON}")):
        res = read_device_results(path)
        if res.records:
            out.append(section(res.device, res.records, host_rows, str(path.relative_to(run_dir))))
    return out
