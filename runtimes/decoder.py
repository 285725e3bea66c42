"""Greedy decoding sessions over a decoder ONNX graph: numpy and onnxruntime only, no import of dsk_compress.

A deploy bundle ships this very file as ``dsk_decoder.py`` beside ``run.py`` (Python 3.8+), so a board
decodes exactly as the host's bench stage does. Every session wraps an ``onnxruntime.InferenceSession``
the caller built (``run.py`` with the device's providers, :mod:`dsk_compress.runtimes.decode` with
:func:`~dsk_compress.runtimes.onnxruntime.make_session`); a path works too in the source tree.

Two graph kinds. The plain KV-cache graph :mod:`dsk_compress.export.kv_cache` writes (``input_ids``,
``attention_mask``, ``past_key_values.{i}.key/value`` in; ``logits``, ``present.{i}.key/value`` out):
:class:`KVCacheSession` feeds each step's ``present`` tensors back as the next past as ONNX Runtime
values. The fused graph :mod:`dsk_compress.export.fused` writes (``seqlens_k`` and
``total_sequence_length`` instead of the mask, past and present sharing one buffer; its interface is
defined here, with the runtime): :class:`FusedDecoderSession` decodes with IO binding and preallocated
buffers. :func:`decoder_for` picks the class for a session, :func:`decode_steps` gives the
``(prefill, step)`` pair that ``measure.decode_loop`` times.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

try:
    from dsk_compress.runtimes.base import RuntimeBackendError as DecoderError
except ImportError:  # in a deploy bundle: no dsk_compress, the same (message, hint) error

    class DecoderError(RuntimeError):
        def __init__(self, message, hint=None):
            super().__init__(message if hint is None else "%s (%s)" % (message, hint))
            self.message, self.hint = message, hint


# the interface of every decoder graph (export.kv_cache's and export.fused's): one naming for the cache tensors
INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, LOGITS = "input_ids", "seqlens_k", "total_sequence_length", "logits"
METADATA_KEY = "dsk_compress.fused_decoder"
"""Key of the JSON metadata (layout, precision, max positions) a fused decoder graph stores in its metadata_props."""
_NUMPY_TYPES = {"tensor(float16)": np.float16, "tensor(double)": np.float64}


def past_names(i: int) -> tuple[str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def present_names(i: int) -> tuple[str, str]:
    return f"present.{i}.key", f"present.{i}.value"


def _session(path, threads, optimization):
    from dsk_compress.runtimes.onnxruntime import make_session  # the source tree; a bundle's run.py passes its own session

    return make_session(path, threads=threads, optimization=optimization)


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
            raise DecoderError(
                "the ONNX model has no fused-decoder metadata: it was not written by export.fused",
                hint="export it with dsk_compress.export.fused",
            )
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
        session: an ``onnxruntime.InferenceSession`` of the graph built by the caller (e.g. ``run.py`` with the
            device's providers); ``path``, ``threads`` and ``optimization`` are then ignored.
    """

    def __init__(self, path: str | os.PathLike | None, threads: int | None = None, optimization: str = "extended", session=None) -> None:
        self.session = session if session is not None else _session(path, threads, optimization)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_inputs = [n for n in inputs if n.startswith("past_key_values.")]
        if "input_ids" not in inputs or "attention_mask" not in inputs or not self.past_inputs:
            raise DecoderError(
                "%s is not a KV-cache graph (inputs: %s)" % (path or "the session", ", ".join(inputs)),
                hint="export it with dsk_compress.export.kv_cache",
            )
        self.output_names = [o.name for o in self.session.get_outputs()]
        # present.{i}.key -> past_key_values.{i}.key
        self.feedback = {o: "past_key_values." + o[len("present.") :] for o in self.output_names if o.startswith("present.")}
        self.dtype = _NUMPY_TYPES.get(inputs[self.past_inputs[0]].type, np.float32)
        self.empty = {}
        for n in self.past_inputs:
            shape = inputs[n].shape
            heads, dim = shape[1], shape[3]
            if not (isinstance(heads, int) and isinstance(dim, int)):
                raise DecoderError("%s: past input %s has no static heads/width (%s)" % (path or "the session", n, shape))
            self.empty[n] = np.zeros((1, heads, 0, dim), self.dtype)
        import onnxruntime

        self._ortvalue = onnxruntime.OrtValue.ortvalue_from_numpy

    def _run(self, ids: np.ndarray, total: int, past: dict) -> tuple[np.ndarray, dict]:
        feed = {
            "input_ids": self._ortvalue(np.ascontiguousarray(ids, np.int64).reshape(1, -1)),
            "attention_mask": self._ortvalue(np.ones((1, total), np.int64)),
            **past,
        }
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


def bind_cache(io, layout: FusedLayout, batch: int, length: int) -> list:
    """Fresh zeroed KV buffers ``[batch, kv_heads, length, head_dim]``, one per layer and key / value, each bound on ``io`` as
    that layer's past input and its present output (GroupQueryAttention appends in place). Returns their OrtValues, which
    hold the numpy buffers."""
    import onnxruntime

    cache = []
    for i in range(layout.layers):
        for past, present in zip(past_names(i), present_names(i)):
            ov = onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros((batch, layout.kv_heads, length, layout.head_dim), np.float32))
            io.bind_ortvalue_input(past, ov)
            io.bind_ortvalue_output(present, ov)
            cache.append(ov)
    return cache


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

    def __init__(
        self,
        path: str | os.PathLike | None,
        threads: int | None = None,
        optimization: str = "extended",
        max_sequence: int | None = None,
        session=None,
    ) -> None:
        import onnxruntime

        self.session = session if session is not None else _session(path, threads, optimization)
        if not is_fused_graph(self.session):
            raise DecoderError(
                "%s is not a fused decoder graph (no seqlens_k input)" % (path or "the session"),
                hint="export it with dsk_compress.export.fused, or use KVCacheSession",
            )
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
            raise DecoderError(
                f"{max_sequence} tokens exceed the model's {lay.max_positions} positions",
                hint="shorten the prompt or the number of new tokens",
            )
        self._cache = bind_cache(self.io, lay, 1, max_sequence)
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
            raise DecoderError(f"the KV cache holds {self.max_sequence} tokens and is full", hint="allocate a longer cache")
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


class FusedFullSequence:
    """A fused decoder graph as a full-sequence model: ``predict(ids [B, S]) -> logits [B, S, V]``, each row run from an
    empty cache (``seqlens_k`` = S - 1, ``total_sequence_length`` = S), so one graph serves accuracy, prefill latency and
    decoding and a bundle ships its weights once. The cache buffers of the last batch shape are kept (prefill writes
    positions 0..S-1 before attention reads them, so their old contents never matter) and bound as past and present.
    """

    def __init__(self, session) -> None:
        import onnxruntime

        if not is_fused_graph(session):
            raise DecoderError("the session is not a fused decoder graph (no seqlens_k input)", hint="use the graph as it is")
        self.session, self.layout = session, FusedLayout.from_session(session)
        self._ov = onnxruntime.OrtValue.ortvalue_from_numpy
        self.io = session.io_binding()
        self._shape, self._cache = None, []

    def __call__(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(ids, np.int64))
        batch, seq = ids.shape
        if seq > self.layout.max_positions:
            raise DecoderError(f"{seq} tokens exceed the model's {self.layout.max_positions} positions", hint="use shorter windows")
        if self._shape != (batch, seq):
            self._cache, self._shape = bind_cache(self.io, self.layout, batch, seq), (batch, seq)
        logits = np.empty((batch, seq, self.layout.vocab), np.float32)
        self.io.bind_ortvalue_input(INPUT_IDS, self._ov(ids))
        self.io.bind_ortvalue_input(SEQLENS_K, self._ov(np.full(batch, seq - 1, np.int32)))
        self.io.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self._ov(np.array(seq, np.int32)))
        self.io.bind_ortvalue_output(LOGITS, self._ov(logits))
        self.session.run_with_iobinding(self.io)
        return logits


def decoder_for(session) -> FusedDecoderSession | KVCacheSession:
    """The decoding session for an ``onnxruntime.InferenceSession``: :class:`FusedDecoderSession` for a fused graph, else
    :class:`KVCacheSession` (the plain KV-cache graph)."""
    return (FusedDecoderSession if is_fused_graph(session) else KVCacheSession)(None, session=session)


def decode_steps(sess, prompt: np.ndarray, new_tokens: int):
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
