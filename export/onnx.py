"""ONNX export of causal LMs (float and INT8 Q/DQ), graph simplification, ORT offline optimization.

TorchScript export (``dynamo=False``) turns ``torch.fake_quantize_*`` into QuantizeLinear /
DequantizeLinear pairs; the wrapper passes an explicit 4-D causal mask because transformers'
mask code does not trace. Weight quantizers are folded into int8 initializers so the file really
stores 8-bit weights.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsk_compress.errors import ExportError
from dsk_compress.io import atomic_path, commit

FUSED_OPS = {
    "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm",
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
    "SkipLayerNormalization", "FusedMatMul", "FusedGemm", "Attention", "MultiHeadAttention", "GroupQueryAttention",
    "RotaryEmbedding", "BiasGelu", "FastGelu", "QuickGelu", "Gelu",
}
INTEGER_MATMULS = {"MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm"}


class CausalLMWrapper(nn.Module):
    """``input_ids [B, T] -> logits [B, T, V]`` with an explicit additive causal mask (traceable)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        dtype = next(self.model.parameters()).dtype
        ar = torch.arange(t, device=input_ids.device)
        causal = ar[None, :] > ar[:, None]
        mask = torch.zeros(t, t, dtype=dtype, device=input_ids.device).masked_fill(causal, torch.finfo(dtype).min)
        mask = mask[None, None].expand(input_ids.shape[0], 1, t, t)
        position_ids = ar[None, :].expand(input_ids.shape[0], t)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.logits


def export_causal_lm(model: nn.Module, example: np.ndarray, path: str | Path, opset: int = 17) -> Path:
    """Export ``model`` to ONNX with dynamic batch and sequence axes; atomically written to ``path``."""
    model = model.eval()
    wrapper = CausalLMWrapper(model).eval()
    x = torch.as_tensor(example, dtype=torch.long)
    tmp, final = atomic_path(path)
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (x,),
                str(tmp),
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
    except Exception as e:  # the exporter raises many types; keep the first line
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export failed: {str(e).splitlines()[0][:300]}") from e
    return commit(tmp, final)


def fold_weight_quantizers(path: str | Path) -> int:
    """Replace QuantizeLinear nodes whose input is an initializer by int8 initializers (in place).

    Returns the number of folded weights. ONNX QuantizeLinear rounds half to even, as numpy does.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    consts = {}
    for n in g.node:  # torch may emit weights/scales as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return consts.get(name)

    keep_nodes, folded = [], 0
    new_inits = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and value(n.input[0]) is not None:
            w = value(n.input[0]).astype(np.float32)
            scale = value(n.input[1]).astype(np.float32)
            zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), np.uint8)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * w.ndim
                shape[axis] = -1
                scale_b, zp_b = scale.reshape(shape), zp.astype(np.int32).reshape(shape)
            else:
                scale_b, zp_b = scale, zp.astype(np.int32)
            info = np.iinfo(zp.dtype)
            q = np.clip(np.rint(w / scale_b) + zp_b, info.min, info.max).astype(zp.dtype)
            new_inits.append(numpy_helper.from_array(q, n.output[0]))
            folded += 1
            continue
        keep_nodes.append(n)
    del g.node[:]
    g.node.extend(keep_nodes)
    g.initializer.extend(new_inits)
    # drop float weights nothing uses any more
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    remaining = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(remaining)
    tmp, final = atomic_path(path)
    onnx.save(m, str(tmp))
    commit(tmp, final)
    return folded


def simplify(path: str | Path) -> None:
    """Simplify the graph with onnxslim (constant folding, dead-code removal), in place."""
    import contextlib
    import io

    import onnxslim

    tmp, final = atomic_path(path)
    with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table
        onnxslim.slim(str(path), str(tmp))
    commit(tmp, final)


def ort_optimize(src: str | Path, dst: str | Path, level: str = "extended") -> Path:
    """Run ONNX Runtime's offline graph optimization and save the result.

    EXTENDED is portable across CPUs (ALL would bake in this CPU's layouts). Common-subexpression
    elimination is disabled so the per-Linear activation quantizers stay distinct and every
    quantized Linear fuses into an integer op.
    """
    from dsk_compress.runtimes.onnxruntime import make_session

    tmp, final = atomic_path(dst)
    make_session(src, optimization=level, optimized_model_path=tmp, disabled_optimizers=["CommonSubexpressionElimination"])
    return commit(tmp, final)


def op_histogram(path: str | Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node))


def fused_ops(hist: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in sorted(hist.items()) if k in FUSED_OPS}


def ort_predict(path: str | Path, threads: int | None = None):
    """A task ``predict`` function backed by an ONNX Runtime CPU session."""
    from dsk_compress.runtimes.onnxruntime import make_session, session_predict

    return session_predict(make_session(path, threads=threads))


def file_size(path: str | Path) -> int:
    """Size of an ONNX model including any external-data files beside it."""
    p = Path(path)
    size = p.stat().st_size
    data = p.with_name(p.name + ".data")
    if data.exists():
        size += data.stat().st_size
    return size
