"""ONNX export of causal LMs (float and INT8 Q/DQ), graph simplification, ORT offline optimization.

TorchScript export (``dynamo=False``) turns ``torch.fake_quantize_*`` into QuantizeLinear /
DequantizeLinear pairs; the wrapper passes an explicit 4-D causal mask because transformers'
mask code does not trace. Weight quantizers are folded into int8 initializers so the file really
stores 8-bit weights, stored pre-transposed so each weight DequantizeLinear feeds its MatMul
directly; activation Q/DQ pairs that onnxslim merged are split again, one per consumer, which both
ONNX Runtime (integer fusion of every Linear, int8 activations included) and TensorRT (Q/DQ on
the MatMul inputs) want. ``convert_fp16`` writes a float16 graph with float32 inputs/outputs.
``export_float`` and ``export_fp16`` are what the export stage calls: export, optimize and check the
ONNX outputs against torch (ExportError past the tolerance).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files

FUSED_OPS = {
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulInteger",
    "QGemm",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SkipLayerNormalization",
    "FusedMatMul",
    "FusedGemm",
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "RotaryEmbedding",
    "BiasGelu",
    "FastGelu",
    "QuickGelu",
    "Gelu",
    "MatMulNBits",
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
    """Export ``model`` to ONNX with dynamic batch and sequence axes; atomically written to ``path``.

    MoE blocks switch to their exact dense routing first (:func:`~dsk_compress.compress.moe.densify_moe`): a trace of
    data-dependent routing would bake in the experts the example happened to reach.
    """
    from dsk_compress.compress.moe import densify_moe

    model = densify_moe(model.eval())
    wrapper = CausalLMWrapper(model).eval()
    x = torch.as_tensor(example, dtype=torch.long)
    return torch_export(
        wrapper,
        (x,),
        path,
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
        opset_version=opset,
    )


def torch_export(module: nn.Module, args: tuple, path: str | Path, what: str = "ONNX export", **kwargs) -> Path:
    """``torch.onnx.export`` (TorchScript, constant folding) of ``module`` to ``path``, written atomically through
    :mod:`~dsk_compress.export.graph_files` (weights past the external-data size land in one ``.data`` file).

    A failed export is an ExportError with the exporter's first line, prefixed by ``what``.
    """
    try:
        with graph_files.staged(path) as tmp, torch.no_grad():
            torch.onnx.export(module, args, str(tmp), dynamo=False, do_constant_folding=True, **kwargs)
    except ExportError:
        raise
    except Exception as e:  # the exporter raises many types; keep the first line
        raise ExportError(f"{what} failed: {str(e).splitlines()[0][:300]}") from e
    return Path(path)


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
    graph_files.save(m, path)
    return folded


def toposort(g) -> bool:
    """Reorder ``g.node`` topologically (stable: original order where free); return whether it changed.

    The ONNX spec (and TensorRT's parser) requires topological order; graph rewriters that append
    nodes (ONNX Runtime's float16 converter appends its Casts) break it.
    """
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    nodes = list(g.node)
    waiting = {id(n): sum(1 for i in set(n.input) if i not in known) for n in nodes}
    users: dict[str, list] = {}
    for n in nodes:
        for i in set(n.input):
            if i not in known:
                users.setdefault(i, []).append(n)
    import heapq

    pos = {id(n): k for k, n in enumerate(nodes)}
    ready = [(pos[id(n)], id(n), n) for n in nodes if waiting[id(n)] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, n = heapq.heappop(ready)
        order.append(n)
        for o in n.output:
            for u in users.get(o, []):
                waiting[id(u)] -= 1
                if waiting[id(u)] == 0:
                    heapq.heappush(ready, (pos[id(u)], id(u), u))
    if len(order) != len(nodes):
        raise ExportError(f"the ONNX graph has a cycle or an undefined input ({len(nodes) - len(order)} nodes unreachable)")
    changed = any(a is not b for a, b in zip(order, nodes))
    if changed:
        del g.node[:]
        g.node.extend(order)
    return changed


def _consumers(g) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def fold_weight_transposes(path: str | Path) -> int:
    """Store folded int8 weights transposed where a DequantizeLinear feeds only a 2-D Transpose (in place).

    ``F.linear`` exports as ``MatMul(x, Transpose(DQ(W[out, in])))``; afterwards the int8
    initializer is ``W.T [in, out]`` with the per-channel axis moved to 1, and the DQ feeds the
    MatMul directly (the result is bit-identical). Returns the number of Transposes removed.
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    users = _consumers(g)
    drop, folded = set(), 0
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or len(users.get(n.input[0], [])) != 1:
            continue
        outs = users.get(n.output[0], [])
        if len(outs) != 1 or outs[0].op_type != "Transpose":
            continue
        t = outs[0]
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[n.input[0]])
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        inits[n.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), n.input[0]))
        axis = next((a for a in n.attribute if a.name == "axis"), None)
        if axis is None:
            n.attribute.append(helper.make_attribute("axis", 1))
        else:
            axis.i = 1 - (axis.i % 2)
        for u in users.get(t.output[0], []):
            for j, i in enumerate(u.input):
                if i == t.output[0]:
                    u.input[j] = n.output[0]
        drop.add(id(t))
        folded += 1
    if folded:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        graph_files.save(m, path)
    return folded


def unshare_activation_qdq(path: str | Path) -> int:
    """Give every consumer of a shared activation Q -> DQ pair its own copy (in place); return the copies made.

    onnxslim (and ORT's common-subexpression elimination) merge the quantizers of Linears that read
    the same tensor with the same scale (q/k/v, gate/up after calibration). ONNX Runtime then fuses
    only the Linears with a private DQ into integer ops when activations are int8.
    """
    import copy

    import onnx

    m = onnx.load(str(path))
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    users = _consumers(g)
    taken = {n.name for n in g.node} | set(prod)

    def fresh(base: str) -> str:
        k = 1
        while f"{base}_split{k}" in taken:
            k += 1
        taken.add(f"{base}_split{k}")
        return f"{base}_split{k}"

    out_nodes, added = [], 0
    for n in g.node:
        out_nodes.append(n)
        if n.op_type != "DequantizeLinear":
            continue
        q = prod.get(n.input[0])
        readers = users.get(n.output[0], [])
        if q is None or q.op_type != "QuantizeLinear" or len(readers) < 2 or len(users.get(q.output[0], [])) != 1:
            continue
        for u in readers[1:]:
            q2, dq2 = copy.deepcopy(q), copy.deepcopy(n)
            q2.name, dq2.name = fresh(q.name), fresh(n.name)
            q2.output[0] = fresh(q.output[0])
            dq2.input[0], dq2.output[0] = q2.output[0], fresh(n.output[0])
            for j, i in enumerate(u.input):
                if i == n.output[0]:
                    u.input[j] = dq2.output[0]
            out_nodes += [q2, dq2]  # right after the shared DQ: inputs are defined, consumers come later
            added += 1
    if added:
        del g.node[:]
        g.node.extend(out_nodes)
        graph_files.save(m, path)
    return added


# ops whose float16 error would matter: the RMSNorm / LayerNorm reduction chain and softmax stay float32
FP16_KEEP_FP32_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "LogSoftmax")


def convert_fp16(src: str | Path, dst: str | Path) -> dict:
    """Write a float16 copy of a float32 ONNX model to ``dst``; return what was kept in float32.

    Uses ONNX Runtime's graph converter (``onnxruntime.transformers.float16``, a maintained copy of
    onnxconverter-common's): weights and activations become float16, the model's inputs and outputs
    stay float32, and the normalization reduction chain (``x**2 -> mean -> + eps -> sqrt -> 1/x``)
    and softmax run in float32 behind Cast nodes (fp16 squares overflow above 256; the attention
    mask's large negative constant is clipped to -65504). The result runs in ONNX Runtime on CPU
    (which computes most float16 ops in float32 behind its own casts) and in TensorRT.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src = Path(src)
    large = graph_files.is_large(src)
    if large:  # the converter's own shape inference serializes the graph in memory, which fails past 2 GB: infer by path
        inferred = src.with_name(f".{src.name}.inferred")
        try:
            onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
            m = onnx.load(str(inferred))  # its weights: src's .data file beside it
        finally:
            inferred.unlink(missing_ok=True)
    else:
        m = onnx.load(str(src))
    g = m.graph
    users = _consumers(g)
    keep_nodes = []
    for n in g.node:  # the eps Add after a ReduceMean and the 1/sqrt Div after a Sqrt
        if n.op_type in ("ReduceMean", "Sqrt"):
            for u in users.get(n.output[0], []):
                if u.op_type in ("Add", "Div"):
                    keep_nodes.append(u.name)
    try:
        m16 = convert_float_to_float16(
            m,
            keep_io_types=True,
            disable_shape_infer=large,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32_OPS),
            node_block_list=keep_nodes,
        )
    except Exception as e:  # the converter raises assorted types on graphs it cannot type
        raise ExportError(f"float16 conversion of {Path(src).name} failed: {str(e).splitlines()[0][:300]}") from e
    toposort(m16.graph)  # the converter appends its Cast nodes at the end
    graph_files.save(m16, dst, check=True)
    hist = collections.Counter(n.op_type for n in m.graph.node)
    return {"fp32_ops": {k: hist[k] for k in FP16_KEEP_FP32_OPS if hist.get(k)}, "fp32_nodes": len(keep_nodes)}


def simplify(path: str | Path) -> bool:
    """Simplify the graph with onnxslim (constant folding, dead-code removal), in place; return whether it ran.

    Graphs past :data:`~dsk_compress.export.graph_files.SLIM_MAX_BYTES` of weights skip it (onnxslim holds several
    copies of a graph in memory); ONNX Runtime's optimizer folds constants in them instead.
    """
    import contextlib
    import io

    import onnxslim

    if graph_files.size(path) > graph_files.SLIM_MAX_BYTES:
        return False
    with graph_files.staged(path) as tmp, contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table
        onnxslim.slim(str(path), str(tmp))
    return True


def ort_optimize(src: str | Path, dst: str | Path, level: str = "extended") -> Path:
    """Run ONNX Runtime's offline graph optimization and save the result.

    EXTENDED is portable across CPUs (ALL would bake in this CPU's layouts). Common-subexpression
    elimination is disabled so the per-Linear activation quantizers stay distinct and every
    quantized Linear fuses into an integer op.
    """
    from dsk_compress.runtimes.onnxruntime import make_session

    config = graph_files.ort_session_config(dst) if graph_files.is_large(src) else None
    with graph_files.staged(dst) as tmp:
        make_session(
            src, optimization=level, optimized_model_path=tmp, disabled_optimizers=["CommonSubexpressionElimination"], config=config
        )
        _drop_unpacked_markers(tmp)
    return Path(dst)


def _drop_unpacked_markers(path: Path) -> None:
    """Remove the ``weight_prepacked = 0`` that recent ONNX Runtime (1.32) writes on every MatMulNBits it saves: it states the
    default (the weights are stored as the contrib-op spec lays them out), and onnxruntime before 1.29 refuses the whole
    graph for the unknown attribute (checked: 1.26.0 "Unrecognized attribute: weight_prepacked", 1.29.0 loads)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    hit = False
    for node in m.graph.node:
        keep = [a for a in node.attribute if not (a.name == "weight_prepacked" and a.i == 0)]
        if len(keep) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)
            hit = True
    if hit:  # the tensors stay where they are (external data is referenced, not rewritten)
        onnx.save(m, str(path))


def export_int8_qdq(model: nn.Module, example: np.ndarray, qdq_path: str | Path, opset: int = 17) -> dict:
    """Export a QAT model (weight scales frozen) to a portable int8 Q/DQ ONNX at ``qdq_path``.

    Export, simplify, fold the weight quantizers into int8 initializers stored ``[in, out]``, and
    give each Linear its own activation Q/DQ. The file holds only standard ONNX operators, so
    TensorRT parses it and ONNX Runtime fuses it at load; ``ort_optimize`` it for an offline-
    optimized ORT file. An int8 embedding (QuantEmbedding) is the float table of its dequantized
    rows here (:func:`dsk_compress.export.int8.int8_embedding` makes it int8 in an ORT file).
    Returns the counts of folded weights, removed transposes and split Q/DQ.
    """
    from dsk_compress.export.qat_graphs import dequantized

    qdq_path = Path(qdq_path)
    with dequantized(model):  # an int8 embedding is traced as its dequantized table (int8_embedding stores it as int8)
        raw = export_causal_lm(model, example, qdq_path.with_name(qdq_path.stem + ".raw.onnx"), opset)
    simplify(raw)
    info = {
        "folded_weights": fold_weight_quantizers(raw),
        "weight_transposes_folded": fold_weight_transposes(raw),
        "activation_qdq_split": unshare_activation_qdq(raw),
    }
    graph_files.move(raw, qdq_path)
    return info


def raw_path(path: str | Path) -> Path:
    """``<name>.raw.onnx`` beside ``<name>.onnx``: the exporter's graph before ONNX Runtime's offline optimization."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".onnx") + ".raw.onnx")


def lm_logits(model: nn.Module, example: np.ndarray) -> np.ndarray:
    """The torch reference an exported causal LM is checked against: logits on ``example`` token ids, no cache."""
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(example), use_cache=False).logits.numpy()


def optimize_and_check(
    raw: Path,
    path: Path,
    reference: np.ndarray,
    example: np.ndarray,
    optimization: str,
    parity_atol: float,
    keep_raw: bool = False,
    optimize=None,
) -> dict:
    """Simplify the exported float graph ``raw``, ORT-optimize it to ``path`` (with ``optimize``, default
    :func:`ort_optimize`) and check its outputs on ``example`` against the torch ``reference``.

    ``raw`` is deleted unless ``keep_raw``. Returns ``{"path", "precision", "parity_max_abs_diff", "fused_ops"}``;
    raises ExportError when the largest difference exceeds ``parity_atol``.
    """
    simplify(raw)
    out = (optimize or ort_optimize)(raw, path, optimization)
    if not keep_raw:
        graph_files.remove(raw)
    diff = float(np.abs(ort_predict(out)(example) - reference).max())
    if diff > parity_atol:
        raise ExportError(
            f"{Path(path).name.removesuffix('.onnx')}: ONNX output differs from torch by {diff:.2e} (> parity_atol {parity_atol})",
            hint="raise stages.N.parity_atol or report a bug",
        )
    return {"path": out, "precision": "fp32", "parity_max_abs_diff": diff, "fused_ops": fused_ops(op_histogram(out))}


def export_float(
    model: nn.Module,
    example: np.ndarray,
    path: str | Path,
    opset: int = 17,
    optimization: str = "extended",
    parity_atol: float = 1e-3,
    keep_raw: bool = False,
) -> dict:
    """A float causal LM as an ORT-optimized ONNX file at ``path``, checked against torch on ``example``.

    Export (dynamic batch and sequence), simplify, optimize; ``keep_raw`` keeps the unoptimized graph at
    :func:`raw_path` (the input of fp16 conversion and the PTQ baselines). Returns what
    :func:`optimize_and_check` returns; raises ExportError on a failed export or parity check.
    """
    path = Path(path)
    raw = export_causal_lm(model, example, raw_path(path), opset)
    return optimize_and_check(raw, path, lm_logits(model, example), example, optimization, parity_atol, keep_raw)


def export_fp16(model: nn.Module, src: str | Path, path: str | Path, example: np.ndarray, max_rel_err: float) -> dict:
    """fp16 copy (:func:`convert_fp16`) of the float graph ``src`` at ``path``, checked against the float32 torch ``model``.

    Returns ``{"parity_max_abs_diff", "parity_rel_err", "kept_fp32"}``; raises ExportError when the largest logit
    difference exceeds ``max_rel_err`` of the largest |logit|.
    """
    path = Path(path)
    kept = convert_fp16(src, path)
    ref = lm_logits(model, example)
    diff = float(np.abs(ort_predict(path)(example) - ref).max())
    rel = diff / max(float(np.abs(ref).max()), 1e-12)
    if rel > max_rel_err:
        raise ExportError(
            f"{path.name.removesuffix('.onnx')}: fp16 ONNX logits differ from torch fp32 by {diff:.3g} ({rel:.2e} of max |logit|, "
            f"> fp16_max_rel_err {max_rel_err})",
            hint="raise stages.N.fp16_max_rel_err or export fp32 only",
        )
    return {"parity_max_abs_diff": diff, "parity_rel_err": rel, "kept_fp32": kept}


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
