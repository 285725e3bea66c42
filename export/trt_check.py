"""Static check that an ONNX graph builds in TensorRT 10 with explicit (Q/DQ) INT8 quantization.

TensorRT accepts only symmetric INT8: QuantizeLinear / DequantizeLinear with int8 zero points that
are all 0, a per-tensor (scalar) scale for activations and a per-channel scale on the weights'
output-channel axis; quantized weights in [-127, 127]; UINT8 only as a network input or output;
ONNX operators from the ONNX-TensorRT support matrix only (no ``com.microsoft`` ops, so the graph
must be the one *before* ONNX Runtime's offline optimization). Q/DQ pairs are useful only on the
inputs of the ops TensorRT runs in INT8 (MatMul, Gemm, Conv, ConvTranspose here).

``check_tensorrt_onnx(path)`` returns a list of :class:`Problem` (empty when the graph is fine),
each naming the node. Nothing here imports tensorrt: the check runs on any machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# ONNX operators marked "Y" in the ONNX-TensorRT operator support matrix for TensorRT 10.x
# (https://github.com/onnx/onnx-tensorrt/blob/release/10.1-GA/docs/operators.md, the parser that ships
# with TensorRT 10; "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20").
# Per-op restrictions that matter here (Q/DQ zero point must be 0) are checked separately below.
TRT_SUPPORTED_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot
Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)

MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear (the ``axis`` attribute) needs opset 13
INT8_CONSUMERS = ("MatMul", "Gemm", "Conv", "ConvTranspose")

# Problem kinds
OPSET, ORDER, OP, UINT8, ZERO_POINT, DTYPE, SCALE, AXIS, WEIGHT_RANGE, PLACEMENT = (
    "opset",
    "order",
    "op",
    "uint8",
    "zero_point",
    "dtype",
    "scale",
    "axis",
    "weight_range",
    "placement",
)


@dataclass(frozen=True)
class Problem:
    """One reason the graph would not build (or not quantize) in TensorRT; ``node`` names the ONNX node."""

    node: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message}"


def format_problems(problems: list[Problem], limit: int = 5) -> str:
    """``"N problems: a; b; ... (+M more)"`` for error messages."""
    head = "; ".join(str(p) for p in problems[:limit])
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return f"{len(problems)} TensorRT problem(s): {head}{more}"


class _Graph:
    def __init__(self, model, base_dir: str = "") -> None:
        from onnx import numpy_helper

        self.base_dir = base_dir  # where the graph's external-data file lies (weights are read only when checked)
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.consts: dict[str, Any] = {}
        for n in self.g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.users: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.users.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}
        self._np = numpy_helper

    def value(self, name: str):
        if name in self.inits:
            return self._np.to_array(self.inits[name], base_dir=self.base_dir)
        return self.consts.get(name)

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.consts


def _name(n) -> str:
    return n.name or f"{n.op_type}({', '.join(n.output)})"


def _attr(n, key: str, default):
    for a in n.attribute:
        if a.name == key:
            return a.i if a.type == a.INT else list(a.ints)
    return default


def _weight_axis(consumer, index: int, rank: int) -> int | None:
    """The output-channel axis a per-channel weight scale must use, as ``consumer`` reads input ``index``."""
    op = consumer.op_type
    if op == "MatMul":
        return rank - 1 if index == 1 else rank - 2  # B [K, N]: per N; A [M, K]: per M
    if op == "Gemm":
        if index == 1:
            return 0 if _attr(consumer, "transB", 0) else 1
        return 1 if _attr(consumer, "transA", 0) else 0
    if op == "Conv":
        return 0 if index == 1 else None
    if op == "ConvTranspose":
        return 1 if index == 1 else None
    return None


def check_tensorrt_onnx(model: str | os.PathLike | Any, min_opset: int = MIN_OPSET) -> list[Problem]:
    """Problems that stop ``model`` (a path or an ``onnx.ModelProto``) from building in TensorRT with explicit INT8.

    Checked: default-domain opset >= ``min_opset``; nodes in topological order; every node an ONNX
    operator TensorRT 10 parses; every QuantizeLinear int8 with zero point 0 (one problem per
    quantizer when not), activation scales per-tensor, weight scales per-channel on the
    output-channel axis of the op that reads them, all scales positive, quantized weights in
    [-127, 127], no uint8 tensors inside the graph; each Q feeds only DequantizeLinear and each DQ
    feeds MatMul / Gemm / Conv inputs (a weight DQ may go through one Transpose), nothing dangling.
    The main graph only: subgraphs of If / Loop / Scan are not inspected. Returns ``[]`` when the
    graph is fine.
    """
    import onnx

    on_disk = isinstance(model, (str, os.PathLike))
    m = onnx.load(str(model), load_external_data=False) if on_disk else model
    G = _Graph(m, os.path.dirname(os.fspath(model)) if on_disk else "")
    problems: list[Problem] = []
    add = problems.append

    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < min_opset:
        add(
            Problem(
                m.graph.name or "graph", OPSET, f"opset {opset} < {min_opset}: per-channel Q/DQ needs opset 13 (export with opset >= 13)"
            )
        )

    defined = {i.name for i in m.graph.input} | set(G.inits) | {""}
    for n in m.graph.node:  # the parser reads nodes in file order
        late = [i for i in n.input if i not in defined]
        if late:
            add(Problem(_name(n), ORDER, f"reads {late[0]!r} before any node produces it (the graph is not topologically sorted)"))
        defined.update(n.output)

    int8_ok_inputs: set[str] = set()  # int8 initializers that feed a DequantizeLinear (allowed)
    for n in m.graph.node:
        if n.domain not in ("", "ai.onnx"):
            add(
                Problem(
                    _name(n),
                    OP,
                    f"{n.domain}.{n.op_type} is not an ONNX operator TensorRT parses "
                    "(ship the graph from before ONNX Runtime's offline optimization)",
                )
            )
        elif n.op_type not in TRT_SUPPORTED_OPS:
            add(Problem(_name(n), OP, f"{n.op_type} is not in TensorRT 10's ONNX operator support list"))
        if n.op_type == "Cast" and _attr(n, "to", None) == onnx.TensorProto.UINT8:
            add(Problem(_name(n), UINT8, "casts to uint8; TensorRT allows uint8 only as a network input or output"))
        if n.op_type == "QuantizeLinear":
            _check_quantize(G, n, add)
        elif n.op_type == "DequantizeLinear":
            int8_ok_inputs.add(n.input[0])
            _check_dequantize(G, n, add)
        elif n.op_type in INT8_CONSUMERS:
            _check_partial(G, n, add)

    qdq_inputs = {i for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    for name, init in G.inits.items():
        dt = init.data_type
        if dt == onnx.TensorProto.UINT8 and name not in qdq_inputs:
            add(Problem(name, UINT8, "uint8 initializer; TensorRT allows uint8 only as a network input or output"))
        if dt == onnx.TensorProto.INT8 and name not in int8_ok_inputs and name not in qdq_inputs:
            add(Problem(name, DTYPE, "int8 initializer not read by a DequantizeLinear (TensorRT reaches int8 only through Q/DQ)"))
    return problems


def _zero_point(G: _Graph, n):
    """(dtype name, values or None) of a Q/DQ zero point; ``(None, None)`` when absent."""
    if len(n.input) < 3 or not n.input[2]:
        return None, None
    v = G.value(n.input[2])
    if v is None:
        return "non-constant", None
    return str(v.dtype), v


def _check_zero_point(G: _Graph, n, add, what: str) -> None:
    dt, zp = _zero_point(G, n)
    if dt is None:
        add(Problem(_name(n), UINT8, f"{what} has no zero point, so ONNX types it uint8; TensorRT needs an int8 zero point of 0"))
    elif dt == "uint8":
        vals = np.unique(zp).tolist()
        shown = vals[:3] + (["..."] if len(vals) > 3 else [])
        add(Problem(_name(n), UINT8, f"{what} is uint8 with zero point {shown} (asymmetric); TensorRT needs int8 with zero point 0"))
    elif dt == "non-constant":
        add(Problem(_name(n), ZERO_POINT, f"{what} zero point {n.input[2]!r} is not a constant"))
    elif dt != "int8":
        add(Problem(_name(n), DTYPE, f"{what} is {dt}; this check covers INT8 explicit quantization only"))
    elif np.any(zp != 0):
        add(Problem(_name(n), ZERO_POINT, f"{what} zero point is {np.unique(zp).tolist()[:3]}, TensorRT supports only 0 (symmetric)"))


def _check_scale(G: _Graph, n, add, per_tensor: bool, what: str) -> Any:
    s = G.value(n.input[1])
    if s is None:
        add(Problem(_name(n), SCALE, f"{what} scale {n.input[1]!r} is not a constant"))
        return None
    if per_tensor and s.size != 1:
        add(Problem(_name(n), SCALE, f"{what} scale has {s.size} values; TensorRT needs a per-tensor (scalar) activation scale"))
    if np.any(~(s > 0)):
        add(Problem(_name(n), SCALE, f"{what} scale has non-positive values (min {float(np.min(s)):.3g})"))
    return s


def _check_quantize(G: _Graph, n, add) -> None:
    weight = G.is_const(n.input[0])
    what = "weight quantizer" if weight else "activation quantizer"
    _check_zero_point(G, n, add, what)
    _check_scale(G, n, add, per_tensor=not weight, what=what)
    readers = G.users.get(n.output[0], [])
    if not readers and n.output[0] not in G.outputs:
        add(Problem(_name(n), PLACEMENT, "dangling QuantizeLinear: nothing reads its output"))
    for r in readers:
        if r.op_type != "DequantizeLinear":
            add(Problem(_name(n), PLACEMENT, f"QuantizeLinear feeds {r.op_type} {_name(r)!r}, not a DequantizeLinear"))


def _check_dequantize(G: _Graph, n, add) -> None:
    src = G.prod.get(n.input[0])
    paired = src is not None and src.op_type == "QuantizeLinear"
    # the weight this DQ yields: a folded int8 initializer, or a float constant quantized in-graph by Q
    w = G.value(src.input[0]) if paired else G.value(n.input[0])
    if not paired:  # a paired DQ shares its Q's zero point, which _check_quantize reports once
        _check_zero_point(G, n, add, "weight dequantizer" if w is not None else "dequantizer")
    readers = G.users.get(n.output[0], [])
    if not readers and n.output[0] not in G.outputs:
        add(Problem(_name(n), PLACEMENT, "dangling DequantizeLinear: nothing reads its output"))
    if w is None:  # an activation: per-tensor scale, and the DQ must feed an INT8 op
        _check_scale(G, n, add, per_tensor=True, what="activation dequantizer")
        for r in readers:
            if r.op_type not in INT8_CONSUMERS:
                add(
                    Problem(
                        _name(n),
                        PLACEMENT,
                        f"activation DequantizeLinear feeds {r.op_type} {_name(r)!r}; "
                        f"TensorRT quantizes only the inputs of {'/'.join(INT8_CONSUMERS)} here",
                    )
                )
        return
    if not paired and w.dtype == np.int8 and np.any(w == -128):
        add(Problem(_name(n), WEIGHT_RANGE, "int8 weight holds -128; TensorRT's INT8 weights are symmetric in [-127, 127]"))
    s = G.value(n.input[1]) if paired else _check_scale(G, n, add, per_tensor=False, what="weight")
    axis = _attr(n, "axis", 1)
    axis = axis % w.ndim if w.ndim else 0
    if s is not None and s.size > 1:
        if s.ndim != 1 or s.size != w.shape[axis]:
            add(
                Problem(
                    _name(n),
                    SCALE,
                    f"per-channel scale of shape {list(s.shape)} does not match weight axis {axis} of shape {list(w.shape)}",
                )
            )
    for r in readers:
        eff_axis, consumer, index = axis, r, None
        if r.op_type == "Transpose":  # DQ -> Transpose -> op: TensorRT moves the DQ past the transpose
            perm = _attr(r, "perm", list(range(w.ndim))[::-1])
            eff_axis = perm.index(axis) if axis in perm else axis
            nxt = G.users.get(r.output[0], [])
            if len(nxt) != 1:
                add(
                    Problem(
                        _name(n),
                        PLACEMENT,
                        f"weight DequantizeLinear -> Transpose {_name(r)!r} feeds {len(nxt)} ops, expected one MatMul/Gemm/Conv",
                    )
                )
                continue
            consumer = nxt[0]
            index = list(consumer.input).index(r.output[0])
        else:
            index = list(r.input).index(n.output[0])
        if consumer.op_type not in INT8_CONSUMERS:
            add(
                Problem(
                    _name(n),
                    PLACEMENT,
                    f"weight DequantizeLinear feeds {consumer.op_type} {_name(consumer)!r}, not {'/'.join(INT8_CONSUMERS)}",
                )
            )
            continue
        want = _weight_axis(consumer, index, w.ndim)
        if s is not None and s.size > 1 and want is not None and eff_axis != want:
            add(
                Problem(
                    _name(n),
                    AXIS,
                    f"per-channel weight scale on axis {eff_axis} as {consumer.op_type} {_name(consumer)!r} reads it; "
                    f"the output-channel axis is {want}",
                )
            )


def _check_partial(G: _Graph, n, add) -> None:
    """A MatMul/Gemm/Conv with exactly one of its two main inputs quantized runs in floating point in TensorRT."""
    quantized = []
    for i in n.input[:2]:
        p = G.prod.get(i)
        if p is not None and p.op_type == "Transpose":
            p = G.prod.get(p.input[0])
        quantized.append(p is not None and p.op_type == "DequantizeLinear")
    if any(quantized) and not all(quantized):
        which = "input" if quantized[0] else "weight"
        add(
            Problem(
                _name(n),
                PLACEMENT,
                f"only its {which} is quantized: TensorRT runs {n.op_type} in floating point "
                "(put Q/DQ on both the activation and the weight)",
            )
        )
