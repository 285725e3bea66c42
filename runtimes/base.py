"""The benchmark config and the subprocess driver shared by all runtimes (results: :mod:`.result`).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsk_compress.errors import DskError
from dsk_compress.runtimes.measure import tile_batch
from dsk_compress.runtimes.result import BenchResult

WORKER_MODULE = "dsk_compress.runtimes.bench_worker"
STDERR_TAIL_CHARS = 3000


class RuntimeBackendError(DskError):
    """A model that a runtime cannot load or run."""


class BenchmarkError(RuntimeBackendError):
    """A benchmark worker process that failed; the message carries its stderr tail."""


@dataclass
class BenchConfig:
    """How to time a model (see :mod:`dsk_compress.runtimes.measure`).

    ``batch_size`` is the latency batch: ``warmup`` untimed runs, then ``runs`` timed ones (or runs for
    ``duration_s`` seconds). ``throughput_batches`` are further batch sizes measured after it (one warm-up
    run each, at most ``MAX_BATCH_SECONDS`` once they have 3 runs), skipped where the model refuses them.
    Inputs are tiled/truncated along axis 0 to each batch size. ``threads`` caps intra-op threads (None:
    the runtime's default). ``seq_len``: tokens per item, for tokens/s. ``timeout_s`` bounds the whole
    worker process (None: no limit).
    """

    warmup: int = 5
    runs: int = 30
    batch_size: int = 1
    throughput_batches: tuple[int, ...] = ()
    duration_s: float | None = None
    threads: int | None = None
    seq_len: int | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.batch_size < 1 or any(b < 1 for b in self.throughput_batches):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} and {list(self.throughput_batches)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0 or None, got {self.duration_s}")

    @property
    def batches(self) -> list[int]:
        """The latency batch, then the throughput batches (each once)."""
        return list(dict.fromkeys([self.batch_size, *self.throughput_batches]))


def fit_batch(inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """``inputs`` resized along axis 0 to ``batch_size`` rows (repeating rows if it has fewer)."""
    x = np.asarray(inputs)
    if x.ndim == 0:
        raise RuntimeBackendError("benchmark inputs must have a batch axis (got a 0-d array)")
    if x.shape[0] == 0:
        raise RuntimeBackendError("benchmark inputs are empty along the batch axis")
    return tile_batch(x, batch_size)


def run_worker(
    kind: str,
    model: str | os.PathLike,
    inputs: np.ndarray,
    cfg: BenchConfig,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> BenchResult:
    """Benchmark ``model`` in a fresh worker process and return its validated result.

    Raises :class:`BenchmarkError` (with the worker's stderr tail) if the worker fails or times out.
    """
    model = Path(model)
    if not model.exists():
        raise RuntimeBackendError(f"model not found: {model}", hint="check the path")
    x = fit_batch(inputs, max(cfg.batches))
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
            "--batches",
            ",".join(map(str, cfg.batches)),
            "--warmup",
            str(cfg.warmup),
            "--runs",
            str(cfg.runs),
            "--out",
            str(out_path),
        ]
        for flag, value in (("--threads", cfg.threads), ("--duration", cfg.duration_s), ("--seq-len", cfg.seq_len)):
            if value is not None:
                cmd += [flag, str(value)]
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
    return BenchResult.model_validate(data)


def _tail(stderr: str | bytes | None) -> str:
    if not stderr:
        return ""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", errors="replace")
    s = stderr.strip()
    if len(s) > STDERR_TAIL_CHARS:
        s = "..." + s[-STDERR_TAIL_CHARS:]
    return f":\n{s}"
