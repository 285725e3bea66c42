"""int4 QAT models as ONNX graphs: ONNX Runtime's ``MatMulNBits`` packed from the QAT model's own integers and scales.

A :class:`~dsk_compress.compress.qat.BlockQuantLinear` becomes one ``MatMulNBits`` (com.microsoft) with
``accuracy_level`` 4, whose kernel quantizes its input per row and per block exactly as the fake quant does; nothing is
re-quantized: the packed integers are :meth:`BlockQuantLinear.integer_weight`'s and the scales its learned ones (the
layout: :func:`dsk_compress.export.qat_graphs.nbits_arrays`).

A :class:`~dsk_compress.compress.qat.QuantEmbedding` becomes one ``GatherBlockQuantized`` (com.microsoft, ``bits`` 8):
the int8 table stored as uint8 ``[V, H]`` (q + 128, the operator's default zero point) and its row scales repeated
per block of ``H`` (a power of two, see :func:`~dsk_compress.export.qat_graphs.embedding_block`), so the lookup
dequantizes the rows it gathers, in one kernel, to exactly the numbers the fake quant computes.

Three graphs of one model (``export_int4_lm``, ``export_int4_kv``; the fused decoder graph is written by
:mod:`dsk_compress.export.fused` with :mod:`dsk_compress.export.qat_graphs`' ``nbits_arrays`` and ``embedding_nodes``):
the full-sequence and KV-cache graphs are traced from the model with its fake quant replaced by the float weights it
computes (``qat_graphs.dequantized``), then every MatMul whose weight is such a tensor becomes its ``MatMulNBits`` and
the embedding ``Gather`` its int8 form (``qat_graphs.to_matmul_nbits``); each is checked against the fake-quant torch
model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files
from dsk_compress.export.qat_graphs import dequantized, to_matmul_nbits

if TYPE_CHECKING:
    from torch import nn


def _expected(model: nn.Module) -> dict:
    from dsk_compress.compress.qat import QuantEmbedding, block_quant_layers

    return {"matmul_nbits": len(block_quant_layers(model)), "int8_embeddings": sum(isinstance(m, QuantEmbedding) for m in model.modules())}


def _check_counts(got: dict, model: nn.Module, what: str) -> None:
    want = _expected(model)
    if got != want:
        raise ExportError(
            f"{what}: {got['matmul_nbits']} of {want['matmul_nbits']} int4 QAT Linears became MatMulNBits and "
            f"{got['int8_embeddings']} of {want['int8_embeddings']} int8 embeddings were found in the traced graph",
            hint="report a bug (the traced weights no longer match the fake quant's)",
        )


def export_int4_lm(
    model: nn.Module, example: np.ndarray, path: str | Path, opset: int = 17, optimization: str = "extended", *, min_sqnr_db: float
) -> dict:
    """The full-sequence graph of an int4 QAT causal LM at ``path`` (ORT-optimized), checked against its fake quant on ``example``.

    Returns ``{"path", "precision", "sqnr_db_vs_fake_quant", "max_abs_diff_vs_fake_quant", "matmul_nbits", "int8_embeddings",
    "fused_ops"}``; raises ExportError when a layer was not packed or the SQNR is below ``min_sqnr_db``.
    """
    from dsk_compress.compress.qat import sqnr_db
    from dsk_compress.export.onnx import export_causal_lm, fused_ops, lm_logits, op_histogram, ort_optimize, ort_predict, raw_path

    path = Path(path)
    model = model.eval()
    ref = lm_logits(model, example)
    raw = raw_path(path)
    with dequantized(model) as found:
        export_causal_lm(model, example, raw, opset)
    counts = to_matmul_nbits(raw, found)
    _check_counts(counts, model, path.name)
    ort_optimize(raw, path, optimization)
    graph_files.remove(raw)
    got = ort_predict(path)(example)
    sqnr = round(sqnr_db(ref, got), 2)
    if sqnr < min_sqnr_db:
        raise ExportError(f"{path.name}: int4 ONNX vs torch fake-quant SQNR {sqnr} dB is below {min_sqnr_db} dB", hint="report a bug")
    return {
        "path": path,
        "precision": "int4",
        "sqnr_db_vs_fake_quant": sqnr,
        "max_abs_diff_vs_fake_quant": float(np.abs(got - ref).max()),
        **counts,
        "fused_ops": fused_ops(op_histogram(path)),
    }


def export_int4_kv(
    model: nn.Module,
    path: str | Path,
    example: np.ndarray,
    opset: int = 17,
    optimization: str = "extended",
    *,
    min_sqnr_db: float,
    new_tokens: int = 8,
) -> dict:
    """The KV-cache graph of an int4 QAT decoder at ``path``, checked by greedy decoding against its fake quant
    (:func:`~dsk_compress.export.kv_cache.check_kv_parity` on the first (up to) 16 tokens of ``example[0]``).

    Returns ``{"path", "prompt_tokens", <parity numbers>, "matmul_nbits", "int8_embeddings"}``, or ``{"error"}`` when the KV
    exporter cannot handle the model; raises ExportError when the step-logit SQNR is below ``min_sqnr_db`` or the tokens differ.
    """
    from dsk_compress.export.kv_cache import check_kv_parity, export_causal_lm_with_past
    from dsk_compress.export.onnx import ort_optimize

    path = Path(path)
    model = model.eval()
    raw = path.with_name(path.name.removesuffix(".onnx") + ".raw.onnx")
    try:
        with dequantized(model) as found:
            export_causal_lm_with_past(model, raw, opset)
    except ExportError as e:
        return {"error": e.message}
    counts = to_matmul_nbits(raw, found)
    _check_counts(counts, model, path.name)
    ort_optimize(raw, path, optimization)
    graph_files.remove(raw)
    prompt = np.asarray(example)[0, : min(16, np.asarray(example).shape[1])]
    info = {"path": path, "prompt_tokens": int(prompt.size), **check_kv_parity(model, path, prompt, new_tokens=new_tokens), **counts}
    if info["step_logits_sqnr_db"] < min_sqnr_db or not info["tokens_match"]:
        raise ExportError(
            f"{path.name}: int4 KV step-logit SQNR {info['step_logits_sqnr_db']} dB vs torch fake-quant (min {min_sqnr_db}), "
            f"greedy tokens {'equal' if info['tokens_match'] else 'differ'}",
            hint="set stages.N.kv_cache: false and report a bug",
        )
    return info
