"""Benchmark config/result types and the subprocess driver shared by all runtimes.

Every benchmark runs in a fresh ``python -m dsk_compress.runtimes.bench_worker`` process, so the
reported peak memory is the peak RSS of a process that loaded and ran exactly one model, and one
model's allocations or a backend crash cannot affect the next measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsk_compress.errors import DskError

WORKER_MODULE = "dsk_compress.runtimes.bench_worker"
STDERR_TAIL_CHARS = 3000


class RuntimeBackendError(DskError):
    """A model that a runtime cannot load or run."""


class BenchmarkError(RuntimeBackendError):
    """A benchmark worker process that failed; the message carries its stderr tail."""


@dataclass
class BenchConfig:
    """How to time a model: ``warmup`` untimed runs, then ``runs`` timed ones.

    ``batch_size`` is the number of items per run: inputs are tiled/truncated along axis 0 to
    that size. ``threads`` caps intra-op threads (None: the runtime's default). ``timeout_s``
    bounds the whole worker process (None: no limit).
    """

    warmup: int = 5
    runs: int = 30
    batch_size: int = 1
    threads: int | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")


@dataclass
class BenchResult:
    """Latency statistics in milliseconds over ``runs`` timed runs, plus throughput and peak memory."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    throughput: float  # items/s = batch_size * 1000 / mean
    runs: int
    peak_memory_mb: float | None
    runtime: str
    device: str
    providers: list[str] = field(default_factory=list)
    notes: str = ""
    batch_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(times_ms: list[float] | np.ndarray, batch_size: int = 1, **kw: Any) -> BenchResult:
    """A :class:`BenchResult` from per-run latencies in ms (percentiles by linear interpolation)."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings to summarize")
    p50, p90, p99 = (float(x) for x in np.percentile(t, [50, 90, 99]))
    mean = float(t.mean())
    return BenchResult(
        p50=p50,
        p90=p90,
        p99=p99,
        mean=mean,
        std=float(t.std()),
        throughput=batch_size * 1000.0 / mean if mean > 0 else float("inf"),
        runs=int(t.size),
        batch_size=batch_size,
        **kw,
    )


def fit_batch(inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """``inputs`` resized along axis 0 to ``batch_size`` rows (repeating rows if it has fewer)."""
    x = np.asarray(inputs)
    if x.ndim == 0:
        raise RuntimeBackendError("benchmark inputs must have a batch axis (got a 0-d array)")
    if x.shape[0] == batch_size:
        return x
    if x.shape[0] == 0:
        raise RuntimeBackendError("benchmark inputs are empty along the batch axis")
    idx = np.arange(batch_size) % x.shape[0]
    return np.ascontiguousarray(x[idx])


def run_worker(
    kind: str,
    model: str | os.PathLike,
    inputs: np.ndarray,
    cfg: BenchConfig,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> BenchResult:
    """Benchmark ``model`` in a fresh worker process and return its result.

    Raises :class:`BenchmarkError` (with the worker's stderr tail) if the worker fails or times out.
    """
    model = Path(model)
    if not model.exists():
        raise RuntimeBackendError(f"model not found: {model}", hint="check the path")
    x = fit_batch(inputs, cfg.batch_size)
    with tempfile.TemporaryDirectory(prefix="dsk-bench-") as tmp:
        in_path = Path(tmp) / "inputs.npy"
        out_path = Path(tmp) / "result.json"
        np.save(in_path, x, allow_pickle=False)
        cmd = [
            sys.executable,
            "-m",
            WORKER_MODULE,
            "--kind",
            kind,
            "--model",
            str(model),
            "--inputs",
            str(in_path),
            "--warmup",
            str(cfg.warmup),
            "--runs",
            str(cfg.runs),
            "--out",
            str(out_path),
        ]
        if cfg.threads is not None:
            cmd += ["--threads", str(cfg.threads)]
        cmd += list(extra_args or [])
        child_env = dict(os.environ)
        if cfg.threads is not None:
            child_env["OMP_NUM_THREADS"] = str(cfg.threads)
        child_env.update(env or {})
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s, env=child_env, check=False)
        except subprocess.TimeoutExpired as e:
            raise BenchmarkError(
                f"{kind} benchmark of {model} timed out after {cfg.timeout_s:g}s{_tail(e.stderr)}",
                hint="raise the timeout or lower runs",
            ) from None
        if proc.returncode != 0 or not out_path.is_file():
            raise BenchmarkError(
                f"{kind} benchmark worker for {model} failed (exit code {proc.returncode}){_tail(proc.stderr)}",
            )
        data = json.loads(out_path.read_text())
    return summarize(
        data["times_ms"],
        batch_size=cfg.batch_size,
        peak_memory_mb=data.get("peak_memory_mb"),
        runtime=data["runtime"],
        device=data["device"],
        providers=list(data.get("providers", [])),
        notes=data.get("notes", ""),
        extra=dict(data.get("extra", {})),
    )


def _tail(stderr: str | bytes | None) -> str:
    if not stderr:
        return ""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", errors="replace")
    s = stderr.strip()
    if len(s) > STDERR_TAIL_CHARS:
        s = "..." + s[-STDERR_TAIL_CHARS:]
    return f":\n{s}"
