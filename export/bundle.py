"""Deploy bundles: one folder per target device with the model, a model card, ``run.py`` and requirements.

``run.py`` needs only numpy and onnxruntime (TensorRT optional on Jetson): it benchmarks the model
and evaluates it on the validation sample shipped in the bundle, so the accuracy and latency a user
sees on the device are measured there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from dsk_compress.errors import RunError
from dsk_compress.io import atomic_write_json, atomic_write_text

RUN_PY = r'''#!/usr/bin/env python3
"""Benchmark and evaluate this bundle's model on the device it runs on (needs numpy + onnxruntime)."""
import argparse, json, math, platform, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def ort_predict(model, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.astype(np.int64)})[0]


def trt_predict(model):
    # Jetson: build a TensorRT engine from the ONNX on the device (engines are device-specific)
    import tensorrt as trt
    import torch
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(model).read_bytes()):
        raise SystemExit("TensorRT could not parse the model: " + str(parser.get_error(0)))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    seq = CARD["seq_len"]
    profile.set_shape("input_ids", (1, 1), (1, seq), (8, seq))
    config.add_optimization_profile(profile)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    ctx = engine.create_execution_context()
    stream = torch.cuda.Stream()

    def predict(x):
        inp = torch.as_tensor(x, dtype=torch.int64, device="cuda").contiguous()
        ctx.set_input_shape("input_ids", tuple(inp.shape))
        out = torch.empty(tuple(ctx.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
        ctx.set_tensor_address("input_ids", inp.data_ptr())
        ctx.set_tensor_address("logits", out.data_ptr())
        ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()
    return predict


def evaluate(predict, windows, batch=8):
    correct = count = 0
    nll = 0.0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch].astype(np.int64)
        logits = predict(x)[:, :-1].astype(np.float64)
        t = x[:, 1:]
        m = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
        nll += float((logz - np.take_along_axis(logits, t[..., None], -1)[..., 0]).sum())
        correct += int((logits.argmax(-1) == t).sum())
        count += t.size
    return {"accuracy": 100.0 * correct / count, "bits_per_byte": nll / count / math.log(2)}


CARD = json.loads((HERE / "model_card.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runtime", choices=["onnxruntime", "tensorrt"], default=CARD["runtime"])
    ap.add_argument("--threads", type=int, default=CARD.get("threads"))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--out", default="results.json")
    a = ap.parse_args()
    model = HERE / CARD["model"]
    if a.runtime == "tensorrt":
        try:
            predict = trt_predict(model)
        except ImportError:
            print("tensorrt is not installed: falling back to onnxruntime")
            a.runtime = "onnxruntime"
    if a.runtime == "onnxruntime":
        predict = ort_predict(model, a.threads)
    windows = np.load(HERE / "eval_windows.npy")
    x = windows[:1].astype(np.int64)
    for _ in range(a.warmup):
        predict(x)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - t0) * 1e3)
    res = {"model": CARD["model"], "runtime": a.runtime, "machine": platform.machine(), "node": platform.node(),
           "latency_ms": {q: float(np.percentile(times, p)) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
           "batch_size": 1, "seq_len": int(x.shape[1])}
    if not a.no_eval:
        res.update(evaluate(predict, windows))
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
'''


def _pick_variant(report: dict, precision: str) -> dict:
    variants = report["variants"]
    if precision == "int8":
        want = [v for v in variants if v["role"] == "final"]
    else:
        want = [v for v in variants if v["role"] == "student"][-1:]
    if not want or not want[0].get("artifact"):
        raise RunError(f"the run has no {precision} student artifact to bundle", hint="run a recipe with export and bench stages")
    return want[0]


def make_bundle(run_dir: str | Path, device: str, out: str | Path | None = None) -> Path:
    """Write a deploy bundle of a finished run for ``device`` and return its folder."""
    from dsk_compress.devices import load_device
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.report import load_report
    from dsk_compress.tasks import build_task

    run_dir = Path(run_dir)
    report = load_report(run_dir)
    prof = load_device(device)
    precision = prof.preferred_precision if prof.preferred_precision == "int8" else "fp32"
    v = _pick_variant(report, precision)
    dest = Path(out) if out else run_dir / "bundles" / prof.name
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(run_dir / v["artifact"], tmp / "model.onnx")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = RecipeSpec.model_validate(manifest["recipe"])
    task = build_task(spec.task.model_dump())
    windows = np.concatenate(list(task.eval_batches(64))).astype(np.uint8)
    np.save(tmp / "eval_windows.npy", windows)
    runtime = "tensorrt" if prof.preferred_runtime == "tensorrt" else "onnxruntime"
    card = {
        "version": 1, "model": "model.onnx", "variant": v["name"], "precision": v["precision"], "device": prof.name,
        "runtime": runtime, "threads": prof.threads, "seq_len": task.seq_len, "task": task.describe(),
        "params": v["params"], "size_bytes": v["size_bytes"],
        "measured_on_build_host": {"accuracy": v["accuracy"], "bits_per_byte": v["bits_per_byte"], "latency_ms": v["latency_ms"],
                                   "runtime": v["runtime"], "host": report.get("host")},
        "source_run": str(run_dir), "recipe": spec.name,
    }
    atomic_write_json(tmp / "model_card.json", card)
    atomic_write_text(tmp / "run.py", RUN_PY)
    reqs = ["numpy>=1.24", "onnxruntime>=1.17"]
    if runtime == "tensorrt":
        reqs.append("# on Jetson: TensorRT and torch come with JetPack; run.py falls back to onnxruntime without them")
    atomic_write_text(tmp / "requirements.txt", "\n".join(reqs) + "\n")
    atomic_write_text(tmp / "README.md", (
        f"# {spec.name} for {prof.name}\n\n{prof.description}\n\n"
        f"Model: `{v['name']}` ({v['precision']}, {v['params']:,} parameters, {v['size_bytes'] / 1e6:.2f} MB).\n"
        f"Measured on the build host ({v['runtime']}): accuracy {v['accuracy']:.2f}%, p50 {v['latency_ms']['p50']:.2f} ms at batch 1.\n"
        "These are not device figures: measure on the device with\n\n"
        "```bash\npip install -r requirements.txt\npython3 run.py --out results.json\n```\n"
    ))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
