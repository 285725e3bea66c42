"""The one benchmark method of every runtime, and the facts that say where a number was measured.

After ``onnxruntime_perf_test``, ``trtexec``, Qualcomm AI Hub profile jobs and MLPerf single-stream:

1. session (or engine) creation time, measured by the caller around its ``load``;
2. the first inference, timed alone (lazy initialisation, kernel selection, ``torch.compile``);
3. for each batch size (1, 8 and 64 where the model allows): warm-up runs, then N timed runs, or
   timed runs for a duration; p50 / p90 / p99 / mean / std / min / max in ms and throughput in items/s
   (and tokens/s for a language model). The first batch size gets ``warmup`` warm-up runs and all ``runs``
   runs (it is the latency figure); larger ones get one warm-up run (the session is warm by then) and stop
   after ``max_batch_s`` seconds once they have 3 runs, so a batch of 64 cannot take minutes. A batch the
   model refuses (a fixed batch axis, a TensorRT profile) or whose output would not fit
   ``max_output_bytes`` is recorded as skipped, with the reason;
4. peak resident memory of the measuring process (``VmHWM``);
5. accuracy on the task's evaluation windows (:func:`score_windows`, the same code the task uses);
6. greedy decode tokens/s for language models (:func:`decode_loop`; :func:`decode_rounds` compares several decoders in
   interleaved rounds).

This module is deliberately dependency-free: the standard library and numpy, Python 3.8 or later, no
import of dsk_compress. A deploy bundle ships this very file as ``dsk_measure.py``, so ``run.py`` on a Pi
or a Jetson measures exactly as the host's bench worker does, and writes the same result layout
(:mod:`dsk_compress.runtimes.result` validates it when the host reads it back).
"""

from __future__ import annotations

import math
import os
import platform
import resource
import socket
import sys
import time

import numpy as np

SCHEMA = "dsk-compress/bench-result"
SCHEMA_VERSION = 1
DEFAULT_BATCHES = (1, 8, 64)
MAX_BATCH_SECONDS = 10.0
MAX_OUTPUT_BYTES = 1 << 30
MIN_RUNS_LARGE_BATCH = 3


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB.

    On Linux this reads VmHWM from /proc/self/status: ``ru_maxrss`` would carry over the parent's
    peak through fork + exec and report the launcher's memory instead of this process's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read().replace("\x00", "").strip()
    except OSError:
        return ""


def cpu_model():
    """The CPU (or board) model: the device-tree model (Raspberry Pi, Jetson), else /proc/cpuinfo's model name,
    else the ARM implementer and part numbers, else ``platform.processor()``; None when nothing says."""
    info = {}
    for line in _read("/proc/cpuinfo").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info.setdefault(k.strip(), v.strip())
    cpu = _read("/proc/device-tree/model") or info.get("model name") or info.get("Model") or info.get("Hardware")
    if not cpu and "CPU part" in info:  # arm64 kernels name no model: implementer and part say which core
        cpu = "ARM implementer %s part %s" % (info.get("CPU implementer", "?"), info["CPU part"])
    return cpu or platform.processor() or None


_FAMILY = {
    "x86_64": "x86",
    "amd64": "x86",
    "i386": "x86",
    "i686": "x86",
    "aarch64": "arm",
    "arm64": "arm",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "riscv64": "riscv",
    "ppc64le": "power",
    "s390x": "s390",
}


def machine_family(machine):
    """The CPU family of a machine name as ``uname -m`` or ``platform.machine()`` says it: x86, arm, ... (others as given)."""
    m = (machine or "").strip().lower()
    return _FAMILY.get(m, m)


def machine_facts():
    """Where this process runs: hostname, machine, CPU model, CPU count, OS and Python."""
    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "os": "%s %s" % (platform.system(), platform.release()),
        "python": platform.python_version(),
    }


def now_utc():
    """The current UTC time, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def tile_batch(x, batch_size):
    """``x`` resized along axis 0 to ``batch_size`` rows (repeating rows if it has fewer)."""
    x = np.asarray(x)
    if x.shape[0] == batch_size:
        return x
    return np.ascontiguousarray(x[np.arange(batch_size) % x.shape[0]])


def latency_stats(times_ms, batch_size, seq_len=None):
    """Percentiles (linear interpolation), mean, spread and throughput of per-run latencies in ms."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings to summarize")
    p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
    mean = float(t.mean())
    items = batch_size * 1000.0 / mean if mean > 0 else float("inf")
    return {
        "batch_size": int(batch_size),
        "runs": int(t.size),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "mean": mean,
        "std": float(t.std()),
        "min": float(t.min()),
        "max": float(t.max()),
        "items_per_s": items,
        "tokens_per_s": items * seq_len if seq_len else None,
    }


def _first_line(e):
    text = str(e).strip().splitlines()
    return (type(e).__name__ + ": " + (text[0] if text else ""))[:300]


def _timed(predict, x, n, until_s, stop_after_s):
    """Up to ``n`` timed calls (or, with ``until_s``, calls until that many seconds passed); ``stop_after_s``
    ends early once ``MIN_RUNS_LARGE_BATCH`` calls are done."""
    perf = time.perf_counter
    times, start = [], perf()
    while True:
        t = perf()
        predict(x)
        times.append((perf() - t) * 1000.0)
        spent = perf() - start
        if until_s is not None:
            if spent >= until_s:
                return times
        elif len(times) >= n or (stop_after_s is not None and spent >= stop_after_s and len(times) >= MIN_RUNS_LARGE_BATCH):
            return times


def time_model(
    predict,
    x,
    batch_sizes=DEFAULT_BATCHES,
    warmup=5,
    runs=30,
    duration_s=None,
    max_batch_s=MAX_BATCH_SECONDS,
    max_output_bytes=MAX_OUTPUT_BYTES,
    seq_len=None,
):
    """Time ``predict`` on ``x`` (rows tiled to each batch size): steps 2 and 3 of the method above.

    Args:
        predict: runs the model on a batch and returns its output (synchronised: on a GPU it must wait).
        x: example inputs with a batch axis.
        batch_sizes: the first is the latency batch; the others are throughput batches, skipped where the
            model refuses them.
        warmup: untimed runs before the first batch size's timed runs.
        runs: timed runs per batch size (ignored with ``duration_s``).
        duration_s: time each batch size for this many seconds instead of ``runs`` runs.
        max_batch_s: larger batch sizes stop after this many seconds once they have 3 runs.
        max_output_bytes: a batch size whose output would be larger is skipped, not run.
        seq_len: tokens per item of a language model (for tokens/s), or None.

    Returns:
        ``{"first_inference_ms", "warmup", "runs", "duration_s", "input_shape", "output_shape", "batches": [...],
        "skipped": [{"batch_size", "reason"}]}``; ``batches`` holds :func:`latency_stats` per batch size.
    """
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError("batch sizes must be >= 1, got %r" % (batch_sizes,))
    x = np.asarray(x)
    first = int(batch_sizes[0])
    x0 = tile_batch(x, first)
    t = time.perf_counter()
    y = predict(x0)
    first_ms = (time.perf_counter() - t) * 1000.0
    out_shape = list(np.shape(y))
    per_item = _nbytes(y) / first
    batches, skipped = [], []
    for i, b in enumerate(int(b) for b in batch_sizes):
        if per_item * b > max_output_bytes:
            skipped.append(
                {"batch_size": b, "reason": "its output would take %.1f GB (limit %.1f GB)" % (per_item * b / 1e9, max_output_bytes / 1e9)}
            )
            continue
        xb = x0 if b == first else tile_batch(x, b)
        try:
            for _ in range(warmup if i == 0 else 1):
                predict(xb)
            times = _timed(predict, xb, runs, duration_s, None if i == 0 else max_batch_s)
        except Exception as e:  # the runtime refused this batch size (fixed batch axis, engine profile, memory)
            if i == 0:
                raise
            skipped.append({"batch_size": b, "reason": _first_line(e)})
            continue
        batches.append(latency_stats(times, b, seq_len))
    return {
        "first_inference_ms": first_ms,
        "warmup": int(warmup),
        "runs": None if duration_s else int(runs),
        "duration_s": duration_s,
        "input_shape": list(x0.shape[1:]),
        "output_shape": out_shape,
        "batches": batches,
        "skipped": skipped,
    }


def _nbytes(y):
    if isinstance(y, (list, tuple)):
        return sum(_nbytes(v) for v in y)
    n = getattr(y, "nbytes", None)
    if n is None and hasattr(y, "element_size"):  # a torch tensor
        n = y.element_size() * y.nelement()
    return int(n or 0)


# --------------------------------------------------------------------------- accuracy


def score_windows(predict, windows, batch_size, logits_dtype="float64"):
    """``(correct, total negative log-likelihood in nats, count)`` of next-token predictions on ``windows``.

    ``windows`` is ``[N, T]`` token ids, scored ``batch_size`` rows at a time; logits are read in
    ``logits_dtype`` (float64, or float32 for large vocabularies). The tasks score torch models and every
    runtime with this function, and a bundle's run.py with its copy, so a device's accuracy and the host's
    come from the same arithmetic.
    """
    correct, nll, count = 0, 0.0, 0
    windows = np.asarray(windows)
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].astype(np.int64)
        logits = np.asarray(predict(x), dtype=logits_dtype)[:, :-1]
        target = x[:, 1:]
        m = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(-1, dtype=np.float64)) + m[..., 0]
        picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
        nll += float((logz - picked).sum())
        correct += int((logits.argmax(-1) == target).sum())
        count += target.size
    return correct, nll, count


def lm_metrics(task, correct, nll, count):
    """A task's metric names for :func:`score_windows`' counts: code-lm ``accuracy`` (%) and ``bits_per_byte``;
    text-lm ``accuracy`` (%), ``nll`` (per-token loss, nats) and ``perplexity``; others ``accuracy`` and ``nll``."""
    acc, per_token = 100.0 * correct / count, nll / count
    if task == "code-lm":
        return {"accuracy": acc, "bits_per_byte": per_token / math.log(2)}
    if task == "text-lm":
        return {"accuracy": acc, "nll": per_token, "perplexity": math.exp(per_token)}
    return {"accuracy": acc, "nll": per_token}


# --------------------------------------------------------------------------- decode


def decode_loop(prefill, step, prompt_tokens, new_tokens, repeats=5, warmup=1):
    """Greedy generation timed: each repeat calls ``prefill()`` (last-position logits of the prompt), then
    ``new_tokens`` times ``step(token, total_length)`` feeding back the argmax.

    Returns the median prefill ms over repeats (and each repeat's in ``prefill_ms_runs``), p50/p90 over every decode
    step, the median over repeats of ``new_tokens / decode seconds`` as ``decode_tokens_per_s`` (each repeat's in
    ``decode_tokens_per_s_runs``) and the last repeat's tokens.
    """
    return decode_rounds([(prefill, step)], prompt_tokens, new_tokens, rounds=repeats, warmup=warmup)[0]


SETTLE_S = 0.1
"""Pause before each repeat when several decoders alternate: after a run, ONNX Runtime's intra-op worker threads spin
for tens of milliseconds (about 50 ms of CPU measured with onnxruntime 1.32), and with 2 threads on 2 cores the last
session's spinning worker halved the next session's decode rate; 0.1 s lets it go idle first."""


def decode_rounds(decoders, prompt_tokens, new_tokens, rounds=5, warmup=1, settle_s=None):
    """:func:`decode_loop` for several ``(prefill, step)`` decoders at once, in interleaved rounds: each round runs one
    repeat of every decoder, starting one further along the list each round, so a slow spell of the machine falls on
    all of them alike rather than on whichever ran then. ``warmup`` untimed repeats of each come first; with several
    decoders each repeat waits ``settle_s`` (default :data:`SETTLE_S`) untimed first. Returns one :func:`decode_loop`
    result per decoder, in order."""
    perf = time.perf_counter
    n = len(decoders)
    settle = (SETTLE_S if n > 1 else 0.0) if settle_s is None else settle_s
    acc = [{"prefill_ms": [], "step_ms": [], "rates": [], "tokens": []} for _ in range(n)]
    for r in range(warmup + rounds):
        for j in range(n):
            i = (j + r) % n
            prefill, step = decoders[i]
            if settle:
                time.sleep(settle)
            t0 = perf()
            tok = int(np.argmax(prefill()))
            t1 = perf()
            times, toks = [], [tok]
            for k in range(new_tokens):
                t = perf()
                tok = int(np.argmax(step(tok, prompt_tokens + k + 1)))
                times.append((perf() - t) * 1000.0)
                toks.append(tok)
            if r >= warmup:
                a = acc[i]
                a["prefill_ms"].append((t1 - t0) * 1000.0)
                a["step_ms"] += times
                if times:
                    a["rates"].append(new_tokens / (sum(times) / 1000.0))
                a["tokens"] = toks
    results = []
    for a in acc:
        out = {
            "prompt_tokens": int(prompt_tokens),
            "new_tokens": int(new_tokens),
            "repeats": int(rounds),
            "prefill_ms": float(np.median(a["prefill_ms"])),
            "prefill_ms_runs": a["prefill_ms"],
            "tokens": a["tokens"],
        }
        if a["step_ms"]:
            p50, p90 = (float(v) for v in np.percentile(a["step_ms"], [50, 90]))
            out.update(
                decode_ms_p50=p50, decode_ms_p90=p90, decode_tokens_per_s=float(np.median(a["rates"])), decode_tokens_per_s_runs=a["rates"]
            )
        results.append(out)
    return results
