"""The decode benchmark of a decoder ONNX graph (fused or plain KV cache), and scoring a fused graph like a full-sequence one.

The decoding sessions themselves (:class:`~dsk_compress.runtimes.decoder.FusedDecoderSession`,
:class:`~dsk_compress.runtimes.decoder.KVCacheSession`) live in :mod:`dsk_compress.runtimes.decoder`, which
deploy bundles ship as ``dsk_decoder.py``. Only ``onnxruntime`` and ``numpy`` are used (imported lazily).

    python -m dsk_compress.runtimes.decode --model A.fused.onnx [--model B.kv.onnx ...] --prompt P.npy \\
        --new-tokens 32 --repeats 5 --warmup 1 [--threads 2] --out RESULT.json

runs :func:`measure_decodes` in its own process (what :func:`benchmark_decode` / :func:`benchmark_decodes` start),
so one benchmark's memory and thread pools cannot touch the next; several graphs in one worker are timed in
interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dsk_compress.runtimes.base import BenchmarkError, RuntimeBackendError, _tail
from dsk_compress.runtimes.decoder import FusedDecoderSession, FusedLayout, decode_steps, decoder_for, past_names
from dsk_compress.runtimes.measure import decode_rounds

DEFAULT_NEW_TOKENS = 32
"""Decode steps per benchmark repeat (the bench stage's setting)."""


def fused_predict(path: str | os.PathLike, threads: int | None = None, optimization: str = "extended"):
    """A task ``predict(x [B, T]) -> logits [B, T, V]`` backed by a fused decoder graph: each call is a batch prefill
    from an empty cache (every row ``T`` tokens), so a fused artifact is scored like a full-sequence graph."""
    from dsk_compress.runtimes.onnxruntime import make_session

    session = make_session(path, threads=threads, optimization=optimization)
    lay = FusedLayout.from_session(session)

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x, np.int64))
        b, t = x.shape
        feed = {"input_ids": x, "seqlens_k": np.full(b, t - 1, np.int32), "total_sequence_length": np.array(t, np.int32)}
        empty = np.zeros((b, lay.kv_heads, t, lay.head_dim), np.float32)
        for i in range(lay.layers):
            feed.update(dict.fromkeys(past_names(i), empty))
        (logits,) = session.run(["logits"], feed)
        return logits

    return predict


def decode_session(path: str | os.PathLike, threads: int | None = None, optimization: str = "extended"):
    """A :class:`FusedDecoderSession` for a fused graph, else a :class:`KVCacheSession` (today's plain KV graph)."""
    from dsk_compress.runtimes.onnxruntime import make_session

    return decoder_for(make_session(path, threads=threads, optimization=optimization))


def measure_decode(
    path: str | os.PathLike | None,
    prompt: np.ndarray,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    optimization: str = "extended",
    session=None,
) -> dict[str, Any]:
    """Time greedy generation with the decoder graph at ``path`` (fused or plain KV, see :func:`decode_session`) in this process.

    Each repeat prefills ``prompt`` (batch 1) and then runs ``new_tokens`` single-token decode steps,
    each feeding the previous argmax. A step's time covers the ORT call and the argmax. Returns the
    median prefill ms over repeats, p50/p90 over every decode step, and the median over repeats of
    ``new_tokens / decode seconds`` as ``decode_tokens_per_s``. ``new_tokens = 0`` times the prefill only.
    ``session``: an already built session of either kind (e.g. one with ORT's profiler on) instead of ``path``.
    """
    return measure_decodes(
        [path], prompt, new_tokens, threads, repeats, warmup, optimization, sessions=None if session is None else [session]
    )[0]


def measure_decodes(
    paths: list,
    prompt: np.ndarray,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    optimization: str = "extended",
    sessions: list | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure_decode` of several decoder graphs in interleaved rounds (``measure.decode_rounds``): ``repeats``
    rounds, each one repeat of every graph, so the figures of the graphs compare. One result per path, in order."""
    if new_tokens < 0 or repeats < 1 or warmup < 0:
        raise RuntimeBackendError(f"need new_tokens >= 0, repeats >= 1, warmup >= 0 (got {new_tokens}, {repeats}, {warmup})")
    import onnxruntime

    prompt = np.asarray(prompt, np.int64).reshape(-1)
    sessions = sessions or [decode_session(p, threads=threads, optimization=optimization) for p in paths]
    rounds = decode_rounds(
        [decode_steps(s, prompt, new_tokens) for s in sessions], prompt.size, new_tokens, rounds=repeats, warmup=warmup
    )  # the method run.py shares
    results = []
    for sess, r in zip(sessions, rounds):
        pf = r["prefill_ms_runs"]
        out = {
            "prompt_tokens": int(prompt.size),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "threads": threads,
            "graph": "fused" if isinstance(sess, FusedDecoderSession) else "kv",
            "prefill_ms": round(r["prefill_ms"], 3),
            "prefill_ms_runs": [round(x, 3) for x in pf],
            **{f"prefill_ms_{k}": round(float(v), 3) for k, v in zip(("p90", "p99", "mean"), (*np.percentile(pf, [90, 99]), np.mean(pf)))},
            "runtime": f"onnxruntime {onnxruntime.__version__} CPU, graph optimization {optimization}",
            "tokens": r["tokens"],
        }
        if "decode_ms_p50" in r:
            out.update(
                {
                    "decode_ms_p50": round(r["decode_ms_p50"], 3),
                    "decode_ms_p90": round(r["decode_ms_p90"], 3),
                    "decode_tokens_per_s": round(r["decode_tokens_per_s"], 2),
                    "decode_tokens_per_s_runs": [round(x, 2) for x in r["decode_tokens_per_s_runs"]],
                }
            )
        results.append(out)
    return results


def benchmark_decode(
    path: str | os.PathLike,
    prompt: np.ndarray,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """:func:`measure_decode` in a fresh worker process; adds ``peak_memory_mb`` of that process.

    Raises :class:`~dsk_compress.runtimes.base.BenchmarkError` with the worker's stderr tail if it fails.
    """
    return benchmark_decodes([path], prompt, new_tokens, threads, repeats, warmup, timeout_s)[0]


def benchmark_decodes(
    paths: list,
    prompt: np.ndarray,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure_decodes` (interleaved rounds) in one fresh worker process; a single graph's result gets the
    process's ``peak_memory_mb`` (with several graphs loaded that figure is theirs together, so it is left out)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise RuntimeBackendError(f"model not found: {path}", hint="export the KV-cache model first")
    with tempfile.TemporaryDirectory(prefix="dsk-decode-") as tmp:
        p, out = Path(tmp) / "prompt.npy", Path(tmp) / "result.json"
        np.save(p, np.asarray(prompt, np.int64).reshape(-1), allow_pickle=False)
        cmd = [
            sys.executable,
            "-m",
            "dsk_compress.runtimes.decode",
            *(a for path in paths for a in ("--model", str(path))),
            "--prompt",
            str(p),
            "--new-tokens",
            str(new_tokens),
            "--repeats",
            str(repeats),
            "--warmup",
            str(warmup),
            "--out",
            str(out),
        ]
        env = dict(os.environ)
        if threads is not None:
            cmd += ["--threads", str(threads)]
            env["OMP_NUM_THREADS"] = str(threads)
        names = ", ".join(str(path) for path in paths)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired as e:
            raise BenchmarkError(
                f"decode benchmark of {names} timed out after {timeout_s:g}s{_tail(e.stderr)}", hint="lower new_tokens or repeats"
            ) from None
        if proc.returncode != 0 or not out.is_file():
            raise BenchmarkError(f"decode benchmark worker for {names} failed (exit code {proc.returncode}){_tail(proc.stderr)}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="greedy-decode benchmark of decoder ONNX graphs (interleaved rounds)")
    ap.add_argument("--model", required=True, action="append", help="a decoder graph (fused or KV cache); repeat to compare several")
    ap.add_argument("--prompt", required=True, help=".npy of prompt token ids")
    ap.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--optimization", default="extended")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = measure_decodes(a.model, np.load(a.prompt, allow_pickle=False), a.new_tokens, a.threads, a.repeats, a.warmup, a.optimization)
    if len(res) == 1:
        from dsk_compress.runtimes.measure import peak_rss_mb

        res[0]["peak_memory_mb"] = round(peak_rss_mb(), 1)
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
