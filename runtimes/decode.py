"""Token-by-token greedy generation with a decoder ONNX graph, and its decode benchmark.

Two graph kinds. The plain KV-cache graph :mod:`dsk_compress.export.kv_cache` writes (``input_ids``,
``attention_mask``, ``past_key_values.{i}.key/value`` in; ``logits``, ``present.{i}.key/value`` out):
:class:`KVCacheSession` feeds each step's ``present`` tensors back as the next past as ONNX Runtime
values. The fused graph :mod:`dsk_compress.export.fused` writes (``seqlens_k`` and
``total_sequence_length`` instead of the mask, past and present sharing one buffer; its interface is
defined here, with the runtime): :class:`FusedDecoderSession` decodes with IO binding and preallocated
buffers. Only ``onnxruntime`` and ``numpy`` are used (imported lazily).

    python -m dsk_compress.runtimes.decode --model M.kv.onnx --prompt P.npy --new-tokens 32 \\
        --repeats 5 --warmup 1 [--threads 2] --out RESULT.json

runs :func:`measure_decode` in its own process (what :func:`benchmark_decode` starts), so one
benchmark's memory and thread pools cannot touch the next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsk_compress.runtimes.base import BenchmarkError, RuntimeBackendError, _tail
from dsk_compress.runtimes.measure import decode_loop

DEFAULT_NEW_TOKENS = 32
"""Decode steps per benchmark repeat (the bench stage's setting)."""


# the interface of every decoder graph (export.kv_cache's and export.fused's): one naming for the cache tensors
INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, LOGITS = "input_ids", "seqlens_k", "total_sequence_length", "logits"
METADATA_KEY = "dsk_compress.fused_decoder"
"""Key of the JSON metadata (layout, precision, max positions) a fused decoder graph stores in its metadata_props."""


def past_names(i: int) -> tuple[str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def present_names(i: int) -> tuple[str, str]:
    return f"present.{i}.key", f"present.{i}.value"


@dataclass(frozen=True)
class FusedLayout:
    """What a runtime needs to drive a fused decoder graph (:mod:`dsk_compress.export.fused`): its cache shape and position limit."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    precision: str
    window: int | None = None

    @classmethod
    def from_session(cls, session) -> FusedLayout:
        meta = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise RuntimeBackendError("the ONNX model has no fused-decoder metadata: it was not written by export.fused",
                                      hint="export it with dsk_compress.export.fused")
        return cls(**json.loads(meta[METADATA_KEY]))


def is_fused_graph(session) -> bool:
    """Whether an ORT session runs a fused decoder graph (it has a ``seqlens_k`` input)."""
    return any(i.name == SEQLENS_K for i in session.get_inputs())


class KVCacheSession:
    """Greedy decoding with a KV-cache ONNX model (batch 1).

    Args:
        path: the ``*.kv.onnx`` model.
        threads: intra-op threads (None: onnxruntime's default).
        optimization: ORT graph optimization level (``extended`` for offline-optimized files).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, optimization: str = "extended") -> None:
        from dsk_compress.runtimes.onnxruntime import _ORT_TYPES, make_session

        self.session = make_session(path, threads=threads, optimization=optimization)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_inputs = [n for n in inputs if n.startswith("past_key_values.")]
        if "input_ids" not in inputs or "attention_mask" not in inputs or not self.past_inputs:
            raise RuntimeBackendError(f"{path} is not a KV-cache graph (inputs: {', '.join(inputs)})",
                                      hint="export it with dsk_compress.export.kv_cache")
        self.output_names = [o.name for o in self.session.get_outputs()]
        # present.{i}.key -> past_key_values.{i}.key
        self.feedback = {o: "past_key_values." + o.removeprefix("present.") for o in self.output_names if o.startswith("present.")}
        self.dtype = _ORT_TYPES.get(inputs[self.past_inputs[0]].type, np.float32)
        self.empty = {}
        for n in self.past_inputs:
            shape = inputs[n].shape
            heads, dim = shape[1], shape[3]
            if not (isinstance(heads, int) and isinstance(dim, int)):
                raise RuntimeBackendError(f"{path}: past input {n} has no static heads/width ({shape})")
            self.empty[n] = np.zeros((1, heads, 0, dim), self.dtype)
        import onnxruntime

        self._ortvalue = onnxruntime.OrtValue.ortvalue_from_numpy

    def _run(self, ids: np.ndarray, total: int, past: dict) -> tuple[np.ndarray, dict]:
        feed = {"input_ids": self._ortvalue(np.ascontiguousarray(ids, np.int64).reshape(1, -1)),
                "attention_mask": self._ortvalue(np.ones((1, total), np.int64)), **past}
        outs = self.session.run_with_ort_values(self.output_names, feed)
        res = dict(zip(self.output_names, outs))
        logits = res.pop("logits").numpy()
        return logits, {self.feedback[k]: v for k, v in res.items()}

    def prefill(self, prompt: np.ndarray) -> tuple[np.ndarray, dict]:
        """Run the prompt with an empty cache: ``(last-position logits [V], cache)``."""
        prompt = np.asarray(prompt, np.int64).reshape(-1)
        logits, past = self._run(prompt, prompt.size, {k: self._ortvalue(v) for k, v in self.empty.items()})
        return logits[0, -1], past

    def step(self, token: int, total: int, past: dict) -> tuple[np.ndarray, dict]:
        """Feed one token; ``total`` counts every token seen including this one."""
        logits, past = self._run(np.array([token], np.int64), total, past)
        return logits[0, -1], past

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Greedy-generate ``new_tokens`` after ``prompt``: ``(tokens [new_tokens], step logits [new_tokens, V])``."""
        prompt = np.asarray(prompt, np.int64).reshape(-1)
        logits, past = self.prefill(prompt)
        toks, steps = [], []
        for k in range(new_tokens):
            steps.append(logits.astype(np.float32))
            toks.append(int(np.argmax(logits)))
            if k + 1 < new_tokens:
                logits, past = self.step(toks[-1], prompt.size + k + 1, past)
        return np.asarray(toks, np.int64), np.stack(steps) if steps else np.zeros((0, 0), np.float32)

    def step_logits(self, prompt: np.ndarray, forced: np.ndarray) -> np.ndarray:
        """Logits after the prompt, then after each token of ``forced`` fed in turn: ``[1 + len(forced), V]``."""
        prompt = np.asarray(prompt, np.int64).reshape(-1)
        logits, past = self.prefill(prompt)
        out = [logits]
        for k, t in enumerate(np.asarray(forced, np.int64).reshape(-1)):
            logits, past = self.step(int(t), prompt.size + k + 1, past)
            out.append(logits)
        return np.stack(out).astype(np.float32)


class FusedDecoderSession:
    """Greedy decoding with a fused decoder graph (:mod:`dsk_compress.export.fused`), batch 1, no per-token allocation.

    The KV cache is one preallocated buffer per layer and key / value, bound through IO binding as both
    the graph's past input and its present output, so GroupQueryAttention appends in place. The token,
    ``seqlens_k`` and ``total_sequence_length`` inputs and the step logits are small numpy arrays wrapped
    once as ONNX Runtime values (they share memory): a decode step writes three integers, runs the bound
    graph and reads the logits, with nothing allocated or copied on the Python side.

    Args:
        path: the fused ``*.onnx`` model.
        threads: intra-op threads (None: onnxruntime's default).
        optimization: ORT graph optimization level applied at load.
        max_sequence: cache length to preallocate (default: grown to what each ``greedy`` call needs, at most
            the model's position limit).
        session: an ``onnxruntime.InferenceSession`` of the graph built by the caller (e.g. with the profiler on);
            ``path``, ``threads`` and ``optimization`` are then ignored.
    """

    def __init__(self, path: str | os.PathLike | None, threads: int | None = None, optimization: str = "extended",
                 max_sequence: int | None = None, session=None) -> None:
        import onnxruntime

        from dsk_compress.runtimes.onnxruntime import make_session

        self.session = session if session is not None else make_session(path, threads=threads, optimization=optimization)
        if not is_fused_graph(self.session):
            raise RuntimeBackendError(f"{path} is not a fused decoder graph (no seqlens_k input)",
                                      hint="export it with dsk_compress.export.fused, or use KVCacheSession")
        self.layout = FusedLayout.from_session(self.session)
        self._ov = onnxruntime.OrtValue.ortvalue_from_numpy
        self.max_sequence = 0
        self._seqlens = np.zeros(1, np.int32)
        self._total = np.zeros((), np.int32)
        self._token = np.zeros((1, 1), np.int64)
        self._step_logits = np.zeros((1, 1, self.layout.vocab), np.float32)
        self.io = self.session.io_binding()
        self.io.bind_ortvalue_input("seqlens_k", self._ov(self._seqlens))
        self.io.bind_ortvalue_input("total_sequence_length", self._ov(self._total))
        if max_sequence is not None:
            self.allocate(max_sequence)

    def allocate(self, max_sequence: int) -> None:
        """(Re)allocate the cache buffers for ``max_sequence`` tokens and bind them as past and present."""
        lay = self.layout
        if max_sequence > lay.max_positions:
            raise RuntimeBackendError(f"{max_sequence} tokens exceed the model's {lay.max_positions} positions",
                                      hint="shorten the prompt or the number of new tokens")
        self._cache = []
        for i in range(lay.layers):
            for past, present in zip(past_names(i), present_names(i)):
                buf = np.zeros((1, lay.kv_heads, max_sequence, lay.head_dim), np.float32)
                ov = self._ov(buf)
                self._cache.append((buf, ov))
                self.io.bind_ortvalue_input(past, ov)
                self.io.bind_ortvalue_output(present, ov)
        self.max_sequence = max_sequence

    def _ensure(self, needed: int) -> None:
        if needed > self.max_sequence:
            self.allocate(needed)

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Run the prompt from an empty cache; return the logits of every prompt position ``[len, V]``."""
        prompt = np.ascontiguousarray(np.asarray(prompt, np.int64).reshape(1, -1))
        n = prompt.shape[1]
        self._ensure(n)
        logits = np.empty((1, n, self.layout.vocab), np.float32)
        self.io.bind_ortvalue_input("input_ids", self._ov(prompt))
        self.io.bind_ortvalue_output("logits", self._ov(logits))
        self._seqlens[0] = n - 1
        self._total[...] = n
        self.session.run_with_iobinding(self.io)
        # steps from here on feed one token and write one row of logits
        self.io.bind_ortvalue_input("input_ids", self._ov(self._token))
        self.io.bind_ortvalue_output("logits", self._ov(self._step_logits))
        self._len = n
        return logits[0]

    def step(self, token: int) -> np.ndarray:
        """Feed one token after the cached ones; return its logits ``[V]`` (a view, overwritten by the next step)."""
        if self._len >= self.max_sequence:
            raise RuntimeBackendError(f"the KV cache holds {self.max_sequence} tokens and is full", hint="allocate a longer cache")
        self._token[0, 0] = token
        self._seqlens[0] = self._len
        self._len += 1
        self._total[...] = self._len
        self.session.run_with_iobinding(self.io)
        return self._step_logits[0, 0]

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Greedy-generate ``new_tokens`` after ``prompt``: ``(tokens [new_tokens], step logits [new_tokens, V])``."""
        prompt = np.asarray(prompt, np.int64).reshape(-1)
        self._ensure(prompt.size + max(new_tokens - 1, 0))
        logits = self.prefill(prompt)[-1]
        toks, steps = [], []
        for k in range(new_tokens):
            steps.append(logits.copy())
            toks.append(int(np.argmax(logits)))
            if k + 1 < new_tokens:
                logits = self.step(toks[-1])
        return np.asarray(toks, np.int64), np.stack(steps) if steps else np.zeros((0, 0), np.float32)

    def step_logits(self, prompt: np.ndarray, forced: np.ndarray) -> np.ndarray:
        """Logits after the prompt, then after each token of ``forced`` fed in turn: ``[1 + len(forced), V]``."""
        prompt = np.asarray(prompt, np.int64).reshape(-1)
        forced = np.asarray(forced, np.int64).reshape(-1)
        self._ensure(prompt.size + forced.size)
        out = [self.prefill(prompt)[-1].copy()]
        for t in forced:
            out.append(self.step(int(t)).copy())
        return np.stack(out)


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
    import onnx

    names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    cls = FusedDecoderSession if SEQLENS_K in names else KVCacheSession
    return cls(path, threads=threads, optimization=optimization)


def _decode_steps(sess, prompt: np.ndarray, new_tokens: int):
    """``(prefill() -> last logits, step(token, total) -> logits)`` for either session kind."""
    if isinstance(sess, FusedDecoderSession):
        sess.allocate(max(sess.max_sequence, prompt.size + new_tokens))
        return (lambda: sess.prefill(prompt)[-1]), (lambda tok, total: sess.step(tok))
    state: dict = {}

    def prefill():
        logits, state["past"] = sess.prefill(prompt)
        return logits

    def step(tok, total):
        logits, state["past"] = sess.step(tok, total, state["past"])
        return logits

    return prefill, step


def measure_decode(path: str | os.PathLike, prompt: np.ndarray, new_tokens: int = DEFAULT_NEW_TOKENS, threads: int | None = None,
                   repeats: int = 5, warmup: int = 1, optimization: str = "extended", session=None) -> dict[str, Any]:
    """Time greedy generation with the decoder graph at ``path`` (fused or plain KV, see :func:`decode_session`) in this process.

    Each repeat prefills ``prompt`` (batch 1) and then runs ``new_tokens`` single-token decode steps,
    each feeding the previous argmax. A step's time covers the ORT call and the argmax. Returns the
    median prefill ms over repeats, p50/p90 over every decode step, and the median over repeats of
    ``new_tokens / decode seconds`` as ``decode_tokens_per_s``. ``new_tokens = 0`` times the prefill only.
    ``session``: an already built session of either kind (e.g. one with ORT's profiler on) instead of ``path``.
    """
    if new_tokens < 0 or repeats < 1 or warmup < 0:
        raise RuntimeBackendError(f"need new_tokens >= 0, repeats >= 1, warmup >= 0 (got {new_tokens}, {repeats}, {warmup})")
    prompt = np.asarray(prompt, np.int64).reshape(-1)
    sess = session if session is not None else decode_session(path, threads=threads, optimization=optimization)
    prefill, step = _decode_steps(sess, prompt, new_tokens)
    r = decode_loop(prefill, step, prompt.size, new_tokens, repeats=repeats, warmup=warmup)  # the method run.py shares
    import onnxruntime

    pf = r["prefill_ms_runs"]
    out = {"prompt_tokens": int(prompt.size), "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
           "graph": "fused" if isinstance(sess, FusedDecoderSession) else "kv",
           "prefill_ms": round(r["prefill_ms"], 3), "prefill_ms_runs": [round(x, 3) for x in pf],
           **{f"prefill_ms_{k}": round(float(v), 3) for k, v in zip(("p90", "p99", "mean"), (*np.percentile(pf, [90, 99]), np.mean(pf)))},
           "runtime": f"onnxruntime {onnxruntime.__version__} CPU, graph optimization {optimization}", "tokens": r["tokens"]}
    if "decode_ms_p50" in r:
        out.update({"decode_ms_p50": round(r["decode_ms_p50"], 3), "decode_ms_p90": round(r["decode_ms_p90"], 3),
                    "decode_tokens_per_s": round(r["decode_tokens_per_s"], 2),
                    "decode_tokens_per_s_runs": [round(x, 2) for x in r["decode_tokens_per_s_runs"]]})
    return out


def benchmark_decode(path: str | os.PathLike, prompt: np.ndarray, new_tokens: int = DEFAULT_NEW_TOKENS, threads: int | None = None,
                     repeats: int = 5, warmup: int = 1, timeout_s: float | None = None) -> dict[str, Any]:
    """:func:`measure_decode` in a fresh worker process; adds ``peak_memory_mb`` of that process.

    Raises :class:`~dsk_compress.runtimes.base.BenchmarkError` with the worker's stderr tail if it fails.
    """
    path = Path(path)
    if not path.is_file():
        raise RuntimeBackendError(f"model not found: {path}", hint="export the KV-cache model first")
    with tempfile.TemporaryDirectory(prefix="dsk-decode-") as tmp:
        p, out = Path(tmp) / "prompt.npy", Path(tmp) / "result.json"
        np.save(p, np.asarray(prompt, np.int64).reshape(-1), allow_pickle=False)
        cmd = [sys.executable, "-m", "dsk_compress.runtimes.decode", "--model", str(path), "--prompt", str(p),
               "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--warmup", str(warmup), "--out", str(out)]
        env = dict(os.environ)
        if threads is not None:
            cmd += ["--threads", str(threads)]
            env["OMP_NUM_THREADS"] = str(threads)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired as e:
            raise BenchmarkError(f"decode benchmark of {path} timed out after {timeout_s:g}s{_tail(e.stderr)}",
                                 hint="lower new_tokens or repeats") from None
        if proc.returncode != 0 or not out.is_file():
            raise BenchmarkError(f"decode benchmark worker for {path} failed (exit code {proc.returncode}){_tail(proc.stderr)}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="greedy-decode benchmark of a KV-cache ONNX model")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True, help=".npy of prompt token ids")
    ap.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--optimization", default="extended")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = measure_decode(a.model, np.load(a.prompt, allow_pickle=False), a.new_tokens, a.threads, a.repeats, a.warmup, a.optimization)
    from dsk_compress.runtimes.measure import peak_rss_mb

    res["peak_memory_mb"] = round(peak_rss_mb(), 1)
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
