"""Post-training quantization baselines with ONNX Runtime's own tools (dynamic and static/calibrated).

They quantize the same float student QAT starts from, so the report can show what QAT buys.
``reduce_range`` (7-bit weights) keeps ORT's u8s8 kernels from saturating on CPUs without VNNI;
exactly the Linear layers QAT quantizes are quantized (attention score MatMuls stay float; the LM head is quantized
unless QAT kept it float: ``head``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dsk_compress.export import graph_files


def _weight_matmuls(src: Path, dst: Path, head: bool = True) -> list[str]:
    """Name every node, and list the MatMuls with a constant 2-D weight (the Linear layers), the LM head (the MatMul that
    writes the graph's output) only with ``head``.

    Activation x activation MatMuls (attention scores) stay float, as in QAT, so the baselines quantize exactly what QAT
    quantizes. Writes the named graph to ``dst``.
    """
    import onnx

    m = onnx.load(str(src))
    for i, n in enumerate(m.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    rank = {i.name: len(i.dims) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            rank[n.output[0]] = len(n.attribute[0].t.dims)
    outputs = {o.name for o in m.graph.output}
    # 2-D weights only: an MoE graph's stacked experts ([E, in, out], one batched MatMul) stay float, as they do in QAT
    # (and ONNX Runtime's MatMulIntegerToFloat refuses their per-channel zero points)
    names = [
        n.name for n in m.graph.node if n.op_type == "MatMul" and rank.get(n.input[1]) == 2 and (head or not (set(n.output) & outputs))
    ]
    graph_files.save(m, dst)
    return names


def quantize_dynamic_int8(src: str | Path, dst: str | Path, head: bool = True) -> Path:
    """ORT dynamic quantization: int8 per-channel weights, activations quantized at run time (the LM head too with ``head``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with graph_files.staged(dst) as tmp:
        named = tmp.with_name("named.onnx")
        nodes = _weight_matmuls(Path(src), named, head)
        quantize_dynamic(
            str(named),
            str(tmp),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            use_external_data_format=graph_files.is_large(named),
        )
        graph_files.remove(named)
    return Path(dst)


def quantize_static_int8(
    src: str | Path, dst: str | Path, calibration: Iterable[np.ndarray], input_name: str = "input_ids", head: bool = True
) -> Path:
    """ORT static quantization (QDQ): per-channel int8 weights, uint8 activations calibrated (min/max) on ``calibration``
    (the LM head too with ``head``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{input_name: np.asarray(x, dtype=np.int64)} for x in calibration])

        def get_next(self):
            return next(self._it, None)

    with graph_files.staged(dst) as tmp:
        named = tmp.with_name("named.onnx")
        nodes = _weight_matmuls(Path(src), named, head)
        quantize_static(
            str(named),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            use_external_data_format=graph_files.is_large(named),
        )
        graph_files.remove(named)
    return Path(dst)


def ptq_baselines(
    src: str | Path, out_dir: str | Path, calibration: Iterable[np.ndarray], optimization: str = "extended", quantizers=None, optimize=None
) -> dict[str, Path]:
    """Dynamic and static INT8 of the float graph ``src`` (the same graph QAT starts from), each ORT-optimized:
    ``{"ptq-dynamic": out_dir/ptq-dynamic.onnx, "ptq-static": out_dir/ptq-static.onnx}``.

    ``quantizers`` (dynamic, static) and ``optimize`` default to this module's (the Linear layers of a causal LM)
    and :func:`dsk_compress.export.onnx.ort_optimize`; :func:`dsk_compress.export.cnn.ptq_baselines` passes its own.
    ``calibration`` feeds the static one. ``src`` is left in place.
    """
    from dsk_compress.export.onnx import ort_optimize

    dynamic, static = quantizers or (quantize_dynamic_int8, quantize_static_int8)
    out_dir = Path(out_dir)
    dyn = dynamic(src, out_dir / "ptq-dynamic.raw.onnx")
    sta = static(src, out_dir / "ptq-static.raw.onnx", calibration)
    out = {}
    for name, q in (("ptq-dynamic", dyn), ("ptq-static", sta)):
        out[name] = (optimize or ort_optimize)(q, out_dir / f"{name}.onnx", optimization)
        graph_files.remove(q)
    return out
