"""INT8 export of a QAT model, checked: the portable Q/DQ graph, its ORT-optimized twin, and their numbers.

Both exporters take a model whose weight scales are frozen (``compress.qat.freeze_for_export``) and write
two files: ``qdq_path``, standard ONNX operators only (what TensorRT, or any ONNX Runtime, loads), and
``path``, the same graph after ONNX Runtime's offline optimization (integer kernels fused). The checks:
the SQNR of the optimized graph against the torch fake-quant model must reach ``min_sqnr_db``, and every
fake-quantized layer must have become an integer op; otherwise ExportError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from dsk_compress.errors import ExportError


def _compare(reference: np.ndarray, qdq_path: Path, path: Path, inputs: np.ndarray, min_sqnr_db: float) -> tuple[dict, dict[str, int]]:
    """The int8 graphs' numbers against the torch ``reference`` on ``inputs``, and the optimized graph's op histogram."""
    from dsk_compress.compress.qat import sqnr_db
    from dsk_compress.export.onnx import op_histogram, ort_predict
    from dsk_compress.runtimes.onnxruntime import make_session, session_predict

    got = ort_predict(path)(inputs)
    sqnr = sqnr_db(reference, got)
    qdq_sqnr = sqnr_db(reference, session_predict(make_session(qdq_path, optimization="disable"))(inputs))
    if sqnr < min_sqnr_db:
        raise ExportError(f"INT8 ONNX vs torch fake-quant SQNR {sqnr:.1f} dB is below {min_sqnr_db} dB")
    numbers = {
        "sqnr_db_vs_fake_quant": round(sqnr, 2),
        "max_abs_diff_vs_fake_quant": float(np.abs(got - reference).max()),
        "qdq_graph_sqnr_db": round(qdq_sqnr, 2),
    }
    return numbers, op_histogram(path)


def int8_embedding(path: str | Path, model: nn.Module) -> int:
    """Store ``model``'s int8 embedding (a QuantEmbedding) as int8 in the ONNX Runtime graph at ``path`` (in place): the Gather
    of its dequantized float table (how :func:`~dsk_compress.export.onnx.export_int8_qdq` traces it) becomes the ``rows``
    lookup of :func:`~dsk_compress.export.qat_graphs.embedding_nodes` (int8 rows, one float scale per row; the same numbers).
    Returns how many lookups were rewritten (0 for a model with a float embedding); ExportError when the graph has none."""
    from dsk_compress.compress.qat import QuantEmbedding
    from dsk_compress.export.qat_graphs import dequantized, to_matmul_nbits

    with dequantized(model) as found:
        tables = {k: m for k, m in found.items() if isinstance(m, QuantEmbedding)}
    if not tables:
        return 0
    n = to_matmul_nbits(path, tables, embedding="rows")["int8_embeddings"]
    if n == 0:
        raise ExportError(
            f"{Path(path).name}: no Gather reads the int8 embedding's table", hint="report a bug; or set qat embedding_bits: null"
        )
    return n


def export_int8_lm(
    model: nn.Module,
    example: np.ndarray,
    qdq_path: str | Path,
    path: str | Path,
    opset: int = 17,
    optimization: str = "extended",
    *,
    min_sqnr_db: float,
) -> dict:
    """A frozen QAT causal LM as INT8 Q/DQ ONNX (``qdq_path``) and ORT-optimized (``path``), checked on ``example``.

    Also runs the static TensorRT check on the Q/DQ graph (its problems are counted, not raised). Returns
    ``{"path", "qdq_path", "sqnr_db_vs_fake_quant", "max_abs_diff_vs_fake_quant", "qdq_graph_sqnr_db",
    "integer_matmuls", "quantized_linears", "folded_weights", "int8_embeddings", "tensorrt_problems",
    "tensorrt_problem_examples", "fused_ops"}``.
    """
    from dsk_compress.compress.qat import quant_layers
    from dsk_compress.export.onnx import INTEGER_MATMULS, export_int8_qdq, fused_ops, lm_logits, ort_optimize
    from dsk_compress.export.trt_check import check_tensorrt_onnx

    qdq_path = Path(qdq_path)
    ref = lm_logits(model, example)
    folded = export_int8_qdq(model, example, qdq_path, opset)["folded_weights"]
    out = ort_optimize(qdq_path, path, optimization)
    embeddings = int8_embedding(out, model)
    numbers, hist = _compare(ref, qdq_path, out, example, min_sqnr_db)
    n_int = sum(v for k, v in hist.items() if k in INTEGER_MATMULS)
    n_q = len(quant_layers(model))
    if n_int != n_q:
        raise ExportError(f"only {n_int} of {n_q} quantized Linears became integer ops in ONNX Runtime")
    problems = check_tensorrt_onnx(qdq_path)
    return {
        "path": out,
        "qdq_path": qdq_path,
        **numbers,
        "integer_matmuls": n_int,
        "quantized_linears": n_q,
        "folded_weights": folded,
        "int8_embeddings": embeddings,
        "tensorrt_problems": len(problems),
        "tensorrt_problem_examples": [str(p) for p in problems[:3]],
        "fused_ops": fused_ops(hist),
    }


def export_int8_module(
    model: nn.Module,
    example: np.ndarray,
    inputs: np.ndarray,
    qdq_path: str | Path,
    path: str | Path,
    opset: int = 17,
    optimization: str = "extended",
    *,
    min_sqnr_db: float,
) -> dict:
    """Your own frozen QAT ``model(x) -> logits`` (BatchNorm folded) as INT8 Q/DQ ONNX (``qdq_path``) and
    ORT-optimized (``path``): traced on ``example``, checked on ``inputs``.

    Returns ``{"path", "qdq_path", "sqnr_db_vs_fake_quant", "max_abs_diff_vs_fake_quant", "qdq_graph_sqnr_db",
    "integer_ops", "integer_convs", "quantized_layers", "quantized_convs", <the graph passes' counts>, "fused_ops"}``.
    """
    from dsk_compress.compress.cnn import torch_predict
    from dsk_compress.compress.qat import QuantConv2d, quant_layers
    from dsk_compress.export.cnn import INTEGER_CONVS, export_int8_qdq, integer_ops, ort_optimize
    from dsk_compress.export.onnx import fused_ops

    qdq_path = Path(qdq_path)
    ref = torch_predict(model)(inputs)
    info = export_int8_qdq(model, example, qdq_path, opset)
    out = ort_optimize(qdq_path, path, optimization)
    numbers, hist = _compare(ref, qdq_path, out, inputs, min_sqnr_db)
    layers = quant_layers(model)
    n_int, n_q = integer_ops(hist), len(layers)
    if n_int != n_q:
        raise ExportError(f"only {n_int} of {n_q} quantized layers became integer ops in ONNX Runtime ({fused_ops(hist)})")
    return {
        "path": out,
        "qdq_path": qdq_path,
        **numbers,
        "integer_ops": n_int,
        "integer_convs": sum(v for k, v in hist.items() if k in INTEGER_CONVS),
        "quantized_layers": n_q,
        "quantized_convs": sum(1 for m in layers if isinstance(m, QuantConv2d)),
        **info,
        "fused_ops": fused_ops(hist),
    }
