"""ONNX export of your own ``model(x) -> logits`` torch models (CNNs): float, INT8 Q/DQ from QAT, and ORT PTQ baselines.

The graph has one input ``input`` and one output ``logits``, both with a dynamic batch axis. The
INT8 path reuses the LM exporter's graph passes (weight quantizers folded into int8 initializers,
one activation Q/DQ per consumer, ONNX Runtime's offline optimization at EXTENDED), after which ONNX
Runtime runs each quantized Conv2d as ``QLinearConv`` (or ``ConvInteger``) and each quantized
Linear as an integer matmul.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsk_compress.export import graph_files

INTEGER_CONVS = {"QLinearConv", "ConvInteger"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_module(model: nn.Module, example: np.ndarray, path: str | Path, opset: int = 17) -> Path:
    """Export ``model`` (eval mode) to ONNX with a dynamic batch axis; atomically written to ``path``."""
    model = model.eval()
    x = torch.as_tensor(example)
    axes = {0: "batch"}
    from dsk_compress.export.onnx import torch_export

    return torch_export(
        model,
        (x,),
        path,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
        opset_version=opset,
    )


def export_float(
    model: nn.Module,
    example: np.ndarray,
    path: str | Path,
    opset: int = 17,
    optimization: str = "extended",
    parity_atol: float = 1e-3,
    keep_raw: bool = False,
) -> dict:
    """The float ``model`` as an ORT-optimized ONNX file at ``path``, checked against torch on ``example``.

    ``keep_raw`` keeps the unoptimized graph (the PTQ baselines' input) at
    :func:`dsk_compress.export.onnx.raw_path`; returns what :func:`dsk_compress.export.onnx.optimize_and_check` returns.
    """
    from dsk_compress.compress.cnn import torch_predict
    from dsk_compress.export.onnx import optimize_and_check, raw_path

    path = Path(path)
    raw = export_module(model, example, raw_path(path), opset)
    ref = torch_predict(model.eval())(example)
    return optimize_and_check(raw, path, ref, example, optimization, parity_atol, keep_raw, optimize=ort_optimize)


def export_int8_qdq(model: nn.Module, example: np.ndarray, qdq_path: str | Path, opset: int = 17) -> dict:
    """Export a QAT model (weight scales frozen) to a portable int8 Q/DQ ONNX at ``qdq_path`` (standard ONNX ops only).

    Besides the LM exporter's passes: a Linear exported as ``Gemm`` becomes ``MatMul`` (+ ``Add``) so ONNX
    Runtime fuses it with a float bias, and an activation quantizer behind a Flatten/Reshape gets an
    exact copy in front of it, so the conv before the reshape has a quantized output and fuses into
    ``QLinearConv``. Every pass leaves the numbers unchanged.
    """
    from dsk_compress.export.onnx import fold_weight_quantizers, fold_weight_transposes, simplify, unshare_activation_qdq

    qdq_path = Path(qdq_path)
    raw = export_module(model, example, qdq_path.with_name(qdq_path.stem + ".raw.onnx"), opset)
    simplify(raw)
    info = {
        "folded_weights": fold_weight_quantizers(raw),
        "gemms_to_matmul": gemm_to_matmul(raw),
        "weight_transposes_folded": fold_weight_transposes(raw),
        "activation_qdq_split": unshare_activation_qdq(raw),
        "qdq_before_reshapes": quantize_before_reshapes(raw),
    }
    graph_files.move(raw, qdq_path)
    return info


def _load(path):
    import onnx

    return onnx.load(str(path))


def _save(m, path) -> None:
    graph_files.save(m, path)


def gemm_to_matmul(path: str | Path) -> int:
    """Rewrite ``Gemm(A, DQ(W), C)`` (alpha = beta = 1, no transA) as ``MatMul(A, [Transpose](DQ(W))) + C`` in place.

    ONNX Runtime fuses a Q/DQ Gemm only with an int32 bias; a MatMul with a float bias add fuses into
    ``MatMulIntegerToFloat``. Returns the number of rewritten Gemms.
    """
    from onnx import helper

    m = _load(path)
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    out, done = [], 0
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w = prod.get(n.input[1]) if n.op_type == "Gemm" else None
        if (
            w is None
            or w.op_type != "DequantizeLinear"
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            out.append(n)
            continue
        b = n.input[1]
        if attrs.get("transB", 0):
            b = f"{n.output[0]}_wT"
            out.append(helper.make_node("Transpose", [n.input[1]], [b], name=f"{n.name or n.output[0]}_transpose", perm=[1, 0]))
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}_matmul" if has_bias else n.output[0]
        out.append(helper.make_node("MatMul", [n.input[0], b], [mm_out], name=f"{n.name or n.output[0]}_matmul"))
        if has_bias:
            out.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name or n.output[0]}_bias"))
        done += 1
    if done:
        del g.node[:]
        g.node.extend(out)
        _save(m, path)
    return done


RESHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")


def quantize_before_reshapes(path: str | Path) -> int:
    """Where an activation QuantizeLinear reads a Flatten/Reshape/Squeeze/Unsqueeze, put an exact copy of
    the Q/DQ pair in front of that op too (in place); return how many were added.

    A per-tensor quantizer commutes with reshapes, and re-quantizing values already on the grid is
    lossless, so the outputs do not change; the producer before the reshape (a conv + ReLU) then ends
    in a QuantizeLinear and ONNX Runtime fuses it into an integer conv.
    """
    import copy

    m = _load(path)
    g = m.graph
    inits = {i.name for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    before: dict[int, list] = {}
    for q in g.node:
        f = prod.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if f is None or f.op_type not in RESHAPE_OPS or f.input[0] in inits or len(users.get(f.output[0], [])) != 1:
            continue
        src = prod.get(f.input[0])
        if src is not None and src.op_type == "DequantizeLinear":
            continue  # already quantized in front
        q2, dq2 = copy.deepcopy(q), copy.deepcopy(q)
        dq2.op_type = "DequantizeLinear"
        q2.name, dq2.name = f"{q.name or q.output[0]}_pre", f"{q.name or q.output[0]}_pre_dq"
        q2.input[0], q2.output[0] = f.input[0], f"{q.output[0]}_pre"
        dq2.input[0], dq2.output[0] = q2.output[0], f"{q.output[0]}_pre_dq"
        f.input[0] = dq2.output[0]
        before.setdefault(id(f), []).extend([q2, dq2])
    if not before:
        return 0
    out = []
    for n in g.node:
        out.extend(before.get(id(n), []))
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    _save(m, path)
    return sum(len(v) for v in before.values()) // 2


def integer_op_counts(hist: dict[str, int]) -> dict[str, int]:
    """The integer convs and matmuls of an op histogram (what ONNX Runtime runs in int8), by op type."""
    from dsk_compress.export.onnx import INTEGER_MATMULS

    return {k: v for k, v in hist.items() if k in INTEGER_CONVS or k in INTEGER_MATMULS}


def integer_ops(hist: dict[str, int]) -> int:
    """How many integer convs and matmuls an op histogram holds."""
    return sum(integer_op_counts(hist).values())


def _named(src: Path, dst: Path) -> None:
    import onnx

    m = onnx.load(str(src))
    for i, n in enumerate(m.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    graph_files.save(m, dst)


def quantize_dynamic_int8(src: str | Path, dst: str | Path) -> Path:
    """ORT dynamic quantization of every Conv and MatMul/Gemm: int8 per-channel 7-bit weights, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with graph_files.staged(dst) as tmp:
        named = tmp.with_name("named.onnx")
        _named(Path(src), named)
        quantize_dynamic(
            str(named),
            str(tmp),
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
        )
        graph_files.remove(named)
    return Path(dst)


def quantize_static_int8(src: str | Path, dst: str | Path, calibration: Iterable[np.ndarray]) -> Path:
    """ORT static quantization (QDQ) of every Conv and MatMul/Gemm: per-channel int8 weights, uint8 activations (min/max calibration)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{INPUT_NAME: np.asarray(x, dtype=np.float32)} for x in calibration])

        def get_next(self):
            return next(self._it, None)

    with graph_files.staged(dst) as tmp:
        named = tmp.with_name("named.onnx")
        _named(Path(src), named)
        quantize_static(
            str(named),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        graph_files.remove(named)
    return Path(dst)


def ort_optimize(src: str | Path, dst: str | Path, level: str = "extended") -> Path:
    """ONNX Runtime's offline optimization for these graphs (EXTENDED: portable across CPUs).

    Like the LM exporter's, with common-subexpression elimination off (one activation quantizer per
    layer) and MatMul + Add fusion off: it would turn a 2-D Linear back into a float Gemm before the
    Q/DQ fusion could make it a ``MatMulIntegerToFloat``.
    """
    from dsk_compress.runtimes.onnxruntime import make_session

    with graph_files.staged(dst) as tmp:
        make_session(
            src, optimization=level, optimized_model_path=tmp, disabled_optimizers=["CommonSubexpressionElimination", "MatMulAddFusion"]
        )
    return Path(dst)


def ptq_baselines(
    src: str | Path, out_dir: str | Path, calibration: Iterable[np.ndarray], optimization: str = "extended"
) -> dict[str, Path]:
    """ORT dynamic and static INT8 of every Conv and Linear of the float graph ``src``
    (:func:`dsk_compress.export.ptq.ptq_baselines` with this module's quantizers and optimizer)."""
    from dsk_compress.export.ptq import ptq_baselines as _ptq

    return _ptq(src, out_dir, calibration, optimization, quantizers=(quantize_dynamic_int8, quantize_static_int8), optimize=ort_optimize)
