"""Post-training quantization baselines with ONNX Runtime's own tools (dynamic and static/calibrated).

They quantize the same float student QAT starts from, so the report can show what QAT buys.
``reduce_range`` (7-bit weights) keeps ORT's u8s8 kernels from saturating on CPUs without VNNI;
the LM head is left in float as in QAT.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dsk_compress.io import atomic_path, commit


def _exclude_lm_head(path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    # the last MatMul producing the logits is the LM head
    out = m.graph.output[0].name
    producers = {o: n for n in m.graph.node for o in n.output}
    node = producers.get(out)
    seen = 0
    while node is not None and node.op_type != "MatMul" and seen < 8:
        node = producers.get(node.input[0])
        seen += 1
    return [node.name] if node is not None and node.op_type == "MatMul" else []


def quantize_dynamic_int8(src: str | Path, dst: str | Path) -> Path:
    """ORT dynamic quantization: int8 per-channel weights, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp, final = atomic_path(dst)
    quantize_dynamic(str(src), str(tmp), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=_exclude_lm_head(Path(src)))
    return commit(tmp, final)


def quantize_static_int8(src: str | Path, dst: str | Path, calibration: Iterable[np.ndarray], input_name: str = "input_ids") -> Path:
    """ORT static quantization (QDQ): per-channel int8 weights, uint8 activations calibrated (min/max) on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{input_name: np.asarray(x, dtype=np.int64)} for x in calibration])

        def get_next(self):
            return next(self._it, None)

    tmp, final = atomic_path(dst)
    quantize_static(str(src), str(tmp), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=_exclude_lm_head(Path(src)))
    return commit(tmp, final)
