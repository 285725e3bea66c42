"""Where a decode step of the fused decoder graph goes, without the profiler: each kernel timed alone at its real shape.

ORT's profiler (``benchmarks/decode.py --profile``) inflates every node by microseconds, so its shares overstate
cheap nodes. This script times, in one process at ``--threads`` intra-op threads with IO binding, the pieces a
decode step of a run's fused graph is made of, each as a one-node (or two-node) ONNX graph with the step's
shapes and, for the Linears, the run's own int8 weights:

- ``run_us``: one ``run_with_iobinding`` of a one-node graph (``Identity``): the fixed cost of a session run;
- ``per_node_us``: the slope between chains of 1 and 61 cheap ``Mul`` nodes (dispatch cost per node);
- every Linear shape of the graph (``[K, N]``) as our int8 kernel (``QuantizeLinear`` + ``MatMulIntegerToFloat``,
  with QAT's scales), as int4 ``MatMulNBits`` (block 32, accuracy level 4, what onnxruntime-genai's int4
  build uses) and as fp32 ``MatMul``; ``QuantizeLinear`` alone;
- ``GroupQueryAttention`` with the graph's heads, rotary caches and one shared KV buffer, at several cached
  lengths (``--positions``);
- the whole fused graph's decode step (prompt 128, then steps), for comparison with the sum of its parts: each
  part is timed with its weights hot in cache, the step streams all four layers' weights through the caches, so
  ``rest of the step`` holds the small nodes' kernels and that memory traffic.

Medians over ``--runs`` calls per kernel, kernels interleaved in ``--rounds`` rounds; each figure has the
session-run cost subtracted (``*_us`` are kernel + node dispatch). Writes ``benchmarks/results/decode_kernels.json``:

    python benchmarks/decode_kernels.py runs/quant-prune-distill-<time>
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from dsk_compress.io import atomic_write_json


def _model(nodes, inputs, outputs, inits, out_type: int = 1):
    from onnx import helper

    g = helper.make_graph(nodes, "k", inputs, [helper.make_tensor_value_info(o, out_type, None) for o in outputs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


class Timed:
    """One small ONNX graph bound once with IO binding; ``once()`` times one run in microseconds. ``feed`` values are
    numpy arrays or ONNX Runtime values (bound as they are); ``outputs`` binds named outputs to given values."""

    def __init__(self, model: bytes, feed: dict, threads: int, outputs: dict | None = None, optimize: bool = True) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        if not optimize:  # a chain of Muls by a constant would be folded into one
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.io = self.sess.io_binding()
        self._keep = [v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for v in feed.values()]
        for k, v in zip(feed, self._keep):
            self.io.bind_ortvalue_input(k, v)
        for o in self.sess.get_outputs():
            if outputs and o.name in outputs:
                self.io.bind_ortvalue_output(o.name, outputs[o.name])
            else:
                self.io.bind_output(o.name)
        for _ in range(50):
            self.sess.run_with_iobinding(self.io)

    def once(self) -> float:
        t = time.perf_counter_ns()
        self.sess.run_with_iobinding(self.io)
        return (time.perf_counter_ns() - t) / 1e3


def _chain(n: int) -> bytes:
    from onnx import helper, numpy_helper

    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Mul", [prev, "c"], [f"y{i}"]))
        prev = f"y{i}"
    return _model(
        nodes, [helper.make_tensor_value_info("x", 1, [1, 1, None])], [prev], [numpy_helper.from_array(np.ones(1, np.float32), "c")]
    )


def linear_kernels(w_int8: np.ndarray, w_scale: np.ndarray, a_scale: np.ndarray, a_zp: np.ndarray, threads: int) -> dict[str, Timed]:
    """Our static int8 Linear, int4 MatMulNBits and fp32 MatMul for one weight, and QuantizeLinear alone."""
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n = w_int8.shape
    x = np.random.default_rng(0).standard_normal((1, 1, k)).astype(np.float32)
    xin = [helper.make_tensor_value_info("x", 1, [1, 1, k])]
    q_inits = [numpy_helper.from_array(a_scale, "as"), numpy_helper.from_array(a_zp, "az")]
    int8 = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"]),
            helper.make_node("MatMulIntegerToFloat", ["xq", "w", "as", "ws", "az"], ["y"], domain="com.microsoft"),
        ],
        xin,
        ["y"],
        [numpy_helper.from_array(w_int8, "w"), numpy_helper.from_array(w_scale, "ws"), *q_inits],
    )
    quant = _model([helper.make_node("QuantizeLinear", ["x", "as", "az"], ["y"])], xin, ["y"], q_inits, out_type=2)  # uint8
    w_fp32 = w_int8.astype(np.float32) * w_scale[None, :]
    import onnx

    fp32 = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], xin, ["y"], [numpy_helper.from_array(w_fp32, "w")])
    q4 = MatMulNBitsQuantizer(onnx.load_from_string(fp32), block_size=32, is_symmetric=True, accuracy_level=4)
    q4.process()
    feed = {"x": x}
    return {
        "int8 QuantizeLinear+MatMulIntegerToFloat": Timed(int8, feed, threads),
        "int4 MatMulNBits": Timed(q4.model.model.SerializeToString(), feed, threads),
        "fp32 MatMul": Timed(fp32, feed, threads),
        "QuantizeLinear alone": Timed(quant, feed, threads),
    }


def gqa_kernel(graph, positions: int, threads: int) -> Timed:
    """The graph's first GroupQueryAttention alone, one new token after ``positions - 1`` cached ones, past = present buffer."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    node = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {i.name: i for i in graph.initializer}
    heads, kv, head_dim = attrs["num_heads"], attrs["kv_num_heads"], numpy_helper.to_array(inits[node.input[7]]).shape[1] * 2
    width = (heads + 2 * kv) * head_dim
    ins = [
        helper.make_tensor_value_info("qkv", 1, [1, 1, width]),
        helper.make_tensor_value_info("pk", 1, [1, kv, None, head_dim]),
        helper.make_tensor_value_info("pv", 1, [1, kv, None, head_dim]),
        helper.make_tensor_value_info("seqlens_k", 6, [1]),
        helper.make_tensor_value_info("total_sequence_length", 6, []),
    ]
    gqa = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "pk", "pv", "seqlens_k", "total_sequence_length", node.input[7], node.input[8]],
        ["out", "k_out", "v_out"],
        domain="com.microsoft",
        **attrs,
    )
    model = _model([gqa], ins, ["out", "k_out", "v_out"], [inits[node.input[7]], inits[node.input[8]]])
    buf = positions + 32
    ov = ort.OrtValue.ortvalue_from_numpy
    k, v = ov(np.zeros((1, kv, buf, head_dim), np.float32)), ov(np.zeros((1, kv, buf, head_dim), np.float32))
    feed = {
        "qkv": np.random.default_rng(0).standard_normal((1, 1, width)).astype(np.float32),
        "pk": k,
        "pv": v,
        "seqlens_k": np.array([positions - 1], np.int32),
        "total_sequence_length": np.array(positions, np.int32),
    }
    return Timed(model, feed, threads, outputs={"k_out": k, "v_out": v})


def linear_shapes(graph) -> list[dict]:
    """One entry per distinct MatMulIntegerToFloat weight shape of the fused int8 graph, with its weights, scales and count."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    out: dict[tuple, dict] = {}
    for n in graph.node:
        if n.op_type != "MatMulIntegerToFloat":
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        e = out.setdefault(
            w.shape,
            {
                "name": n.name.split("/")[0].split(".", 2)[-1],
                "count": 0,
                "w": w,
                "w_scale": numpy_helper.to_array(inits[n.input[3]]),
                "a_scale": numpy_helper.to_array(inits[n.input[2]]),
                "a_zp": numpy_helper.to_array(inits[n.input[4]]),
            },
        )
        e["count"] += 1
    return list(out.values())


def step_us(path: Path, threads: int, rounds: int) -> float:
    """Median decode step (prompt 128, then 32 steps per repeat) of the whole fused graph, in microseconds."""
    from dsk_compress.runtimes.decode import measure_decode

    r = measure_decode(path, np.random.default_rng(0).integers(0, 256, 128), 32, threads, repeats=rounds, warmup=1)
    return r["decode_ms_p50"] * 1000.0


def main() -> None:
    import onnx
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", default="benchmarks/results/decode_kernels.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=1000, help="timed calls per kernel per round")
    ap.add_argument("--positions", default="32,64,128,160,256", help="cached lengths GroupQueryAttention is timed at")
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    fused = a.run_dir / "export" / "student-int8.fused.onnx"
    if not fused.is_file():
        raise SystemExit(f"{fused} not found: run the default recipe through its export stage first")
    graph = onnx.load(str(fused)).graph
    from onnx import helper

    kernels: dict[str, Timed] = {
        "run (Identity)": Timed(
            _model([helper.make_node("Identity", ["x"], ["y"])], [helper.make_tensor_value_info("x", 1, [1, 1, None])], ["y"], []),
            {"x": np.ones((1, 1, 192), np.float32)},
            a.threads,
        ),
        "chain 1 Mul": Timed(_chain(1), {"x": np.ones((1, 1, 192), np.float32)}, a.threads, optimize=False),
        "chain 61 Mul": Timed(_chain(61), {"x": np.ones((1, 1, 192), np.float32)}, a.threads, optimize=False),
    }
    shapes = linear_shapes(graph)
    for s in shapes:
        for kind, t in linear_kernels(s["w"], s["w_scale"], s["a_scale"], s["a_zp"], a.threads).items():
            kernels[f"{s['name']} {list(s['w'].shape)}: {kind}"] = t
    positions = [int(p) for p in a.positions.split(",")]
    for p in positions:
        kernels[f"GroupQueryAttention at {p} positions"] = gqa_kernel(graph, p, a.threads)
    names = list(kernels)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds):
        for j in range(len(names)):
            n = names[(j + r) % len(names)]
            samples[n].append(statistics.median(kernels[n].once() for _ in range(a.runs)))
    med = {n: statistics.median(v) for n, v in samples.items()}
    run = med["run (Identity)"]
    net = {n: round(v - run, 2) for n, v in med.items() if n != "run (Identity)"}
    per_node = (med["chain 61 Mul"] - med["chain 1 Mul"]) / 60
    linears = {}
    for s in shapes:
        key = f"{s['name']} {list(s['w'].shape)}"
        linears[key] = {"per_step": s["count"], **{k.split(": ", 1)[1]: v for k, v in net.items() if k.startswith(key + ":")}}
    gqa = {p: net[f"GroupQueryAttention at {p} positions"] for p in positions}
    slope = float(np.polyfit(positions, [gqa[p] for p in positions], 1)[0])
    step = step_us(fused, a.threads, a.rounds)
    n_nodes = len(graph.node)
    n_gqa = sum(n.op_type == "GroupQueryAttention" for n in graph.node)
    n_other = n_nodes - n_gqa - 2 * sum(v["per_step"] for v in linears.values())  # each int8 Linear: QuantizeLinear + MatMulIntegerToFloat
    int8_linears = sum(v["per_step"] * v["int8 QuantizeLinear+MatMulIntegerToFloat"] for v in linears.values())
    int4_linears = sum(v["per_step"] * v["int4 MatMulNBits"] for v in linears.values())
    mid = 144  # the middle of a 32-token decode after a 128-token prompt
    gqa_mid = float(np.interp(mid, positions, [gqa[p] for p in positions]))
    out = {
        "version": 1,
        "run": str(a.run_dir),
        "graph": str(fused),
        "onnxruntime": onnxruntime.__version__,
        "threads": a.threads,
        "rounds": a.rounds,
        "runs_per_round": a.runs,
        "note": a.note,
        "run_us": round(run, 2),
        "per_node_us": round(per_node, 3),
        "linears_us": linears,
        "group_query_attention_us": {str(p): v for p, v in gqa.items()},
        "group_query_attention_us_per_position": round(slope, 4),
        "fused_int8_graph": {
            "nodes": n_nodes,
            "group_query_attention_nodes": n_gqa,
            "decode_step_p50_us": round(step, 1),
            "isolated_parts_us": {
                "session run": round(run, 1),
                f"dispatch of the {n_other} other nodes (x per_node_us)": round(n_other * per_node, 1),
                "int8 Linears (QuantizeLinear + MatMulIntegerToFloat)": round(int8_linears, 1),
                f"GroupQueryAttention at {mid} positions x {n_gqa}": round(n_gqa * gqa_mid, 1),
            },
            "same Linears as int4 MatMulNBits": round(int4_linears, 1),
        },
    }
    parts = out["fused_int8_graph"]["isolated_parts_us"]
    out["fused_int8_graph"]["rest of the step (norms, Split / QuickGelu / Mul, embedding, lm_head, caches)"] = round(
        step - sum(parts.values()), 1
    )
    atomic_write_json(Path(a.out), out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
