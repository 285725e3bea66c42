"""Deploy bundles: one folder per target device with the model, a model card, ``run.py`` and requirements.

``run.py`` needs only numpy and onnxruntime (TensorRT optional on Jetson): it benchmarks the model
and evaluates it on the validation sample shipped in the bundle, so the accuracy and latency a user
sees on the device are measured there. When the shipped student has a KV-cache graph it is bundled
as ``model.kv.onnx`` and ``run.py --generate N`` measures greedy decode tokens/s with it.
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
    # TensorRT engines are specific to the GPU and the TensorRT version: build one here on first run
    # (with the precision and shape profile the model card names) and cache it next to the model.
    import tensorrt as trt
    import torch
    if not torch.cuda.is_available():
        raise ImportError("no CUDA device")
    spec = CARD.get("tensorrt") or {}
    precision = CARD["precision"]
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    gpu = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in torch.cuda.get_device_name(0))
    engine_path = HERE / ("model.%s.%s.engine" % (trt.__version__, gpu))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes()) if engine_path.is_file() else None
    if engine is None:
        # TensorRT 10: weakly typed + precision flags (int8: Q/DQ in int8, FP16 elsewhere); 11+ has only strong typing.
        # An fp16 model is built strongly typed: it keeps exactly the fp16 / fp32 split of the ONNX.
        weak = hasattr(trt.BuilderFlag, "INT8") and precision != "fp16"
        builder = trt.Builder(logger)
        network = builder.create_network(0 if weak else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model)):
            raise SystemExit("TensorRT could not parse the model: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.get("workspace_gb", 1.0) * (1 << 30)))
        if weak and precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if weak and precision == "int8":  # explicit quantization: the Q/DQ nodes in the model say what runs in int8
            config.set_flag(trt.BuilderFlag.INT8)
        seq = spec.get("max_seq_len") or CARD["seq_len"]
        profile = builder.create_optimization_profile()
        profile.set_shape("input_ids", (1, 1), (spec.get("opt_batch", 1), seq), (spec.get("max_batch", 8), seq))
        config.add_optimization_profile(profile)
        cache_file = HERE / "timing.cache"
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(cache, False)
        print("building the TensorRT engine (%s, once per device)..." % precision)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise SystemExit("TensorRT failed to build the engine (see the log above)")
    from dsk_compress.integrity import check_run_artifacts

        engine_path.write_bytes(bytes(plan))
    check_run_artifacts(run_dir)  # recorded hashes match and every ONNX file loads, before anything is copied
        cache_file.write_bytes(bytes(cache.serialize()))
        engine = runtime.deserialize_cuda_engine(bytes(plan))
    ctx = engine.create_execution_context()
    stream = torch.cuda.Stream()
    dtype = {trt.DataType.INT32: torch.int32}.get(engine.get_tensor_dtype("input_ids"), torch.int64)

    def predict(x):
        inp = torch.as_tensor(x, device="cuda").to(dtype).contiguous()
        if not ctx.set_input_shape("input_ids", tuple(inp.shape)):
            raise SystemExit("input shape %s is outside the engine's profile" % (tuple(inp.shape),))
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


def generate_bench(model, threads, prompt, new_tokens, repeats=5):
    """Greedy decode with the KV-cache graph: prefill ``prompt``, then ``new_tokens`` single-token steps."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs() if i.name.startswith("past_key_values.")}

    def run(ids, total, past):
        feed = {"input_ids": np.asarray(ids, np.int64).reshape(1, -1), "attention_mask": np.ones((1, total), np.int64)}
        feed.update(past)
        res = dict(zip(outs, sess.run(None, feed)))
        return res["logits"][0, -1], {"past_key_values." + k[len("present."):]: v for k, v in res.items() if k.startswith("present.")}

    prefill, steps, rates, tokens = [], [], [], []
    for r in range(repeats + 1):  # the first generation is a warm-up
        t0 = time.perf_counter()
        logits, past = run(prompt, len(prompt), empty)
        tok = int(np.argmax(logits))
        t1 = time.perf_counter()
        times, toks = [], [tok]
        for k in range(new_tokens):
            t = time.perf_counter()
            logits, past = run([tok], len(prompt) + k + 1, past)
            tok = int(np.argmax(logits))
            times.append((time.perf_counter() - t) * 1e3)
            toks.append(tok)
        if r:
            prefill.append((t1 - t0) * 1e3)
            steps += times
            rates.append(new_tokens / (sum(times) / 1e3))
            tokens = toks
    return {"kv_model": Path(model).name, "prompt_tokens": len(prompt), "new_tokens": new_tokens, "repeats": repeats,
            "prefill_ms": float(np.median(prefill)), "decode_ms_p50": float(np.percentile(steps, 50)),
            "decode_ms_p90": float(np.percentile(steps, 90)), "decode_tokens_per_s": float(np.median(rates)), "tokens": tokens}


CARD = json.loads((HERE / "model_card.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runtime", choices=["onnxruntime", "tensorrt"], default=CARD["runtime"])
    ap.add_argument("--threads", type=int, default=CARD.get("threads"))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="also time greedy decode of N tokens with the KV-cache model (onnxruntime), after half a window of prompt")
    ap.add_argument("--out", default="results.json")
    a = ap.parse_args()
    if a.generate and not CARD.get("kv_model"):
        raise SystemExit("--generate needs a KV-cache model, and this bundle has none (export with kv_cache: true)")
    model = HERE / CARD["model"]
    if a.runtime == "tensorrt":
        try:
            predict = trt_predict(model)
        except ImportError as e:
            print("TensorRT is not usable here (%s): falling back to onnxruntime" % e)
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
    if a.generate:
        prompt = [int(t) for t in windows[0][: CARD["seq_len"] // 2]]
        res["generate"] = generate_bench(HERE / CARD["kv_model"], a.threads, prompt, a.generate)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
'''


_ROLE_FOR = {"int8": "final", "fp16": "student-fp16", "fp32": "student"}
_HINT_FOR = {"int8": "run a recipe with qat, export and bench stages",
             "fp16": "rerun the export stage with precisions: [fp32, fp16] (or device: <this device>) and bench",
             "fp32": "run a recipe with export and bench stages"}


def _pick_variant(report: dict, precision: str) -> dict:
    """The report row that ships at ``precision``: the QAT student (int8), its fp16 export, or the last fp32 student."""
    want = [v for v in report["variants"] if v["role"] == _ROLE_FOR[precision]][-1:]
    if not want or not want[0].get("artifact"):
        raise RunError(f"the run has no {precision} student artifact to bundle", hint=_HINT_FOR[precision])
    return want[0]


def _export_artifacts(manifest: dict) -> dict:
    for st in manifest.get("stages", []):
        if st.get("stage") == "export":
            return (st.get("outputs") or {}).get("artifacts", {})
    return {}


def _tensorrt_model(run_dir: Path, v: dict, art: dict, device: str) -> tuple[Path, dict]:
    """The portable ONNX TensorRT parses for this variant (the ORT-optimized file holds contrib ops) and its check."""
    from dsk_compress.export.trt_check import check_tensorrt_onnx, format_problems

    rel = art.get("qdq_path") if v["precision"] == "int8" else v["artifact"]
    if not rel:
        raise RunError(f"the run's {v['name']} has no TensorRT-portable ONNX (it predates portable exports)",
                       hint=f"rerun the export stage with device: {device}")
    path = run_dir / rel
    problems = check_tensorrt_onnx(path)
    if problems:
        hint = ("retrain with the qat stage's activations: symmetric, then export with device: " + device
                if any(p.kind in ("uint8", "zero_point") for p in problems) else "rerun the export stage with device: " + device)
        raise RunError(f"{v['name']} cannot run in TensorRT on {device}: {format_problems(problems, 3)}", hint=hint)
    return path, {"checked": "dsk_compress.export.trt_check: 0 problems"}


def make_bundle(run_dir: str | Path, device: str, out: str | Path | None = None) -> Path:
    """Write a deploy bundle of a finished run for ``device`` and return its folder."""
    from dsk_compress.devices import load_device
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.report import load_report
    from dsk_compress.tasks import build_task

    run_dir = Path(run_dir)
    report = load_report(run_dir)
    prof = load_device(device)
    precision = prof.preferred_precision  # fp32, fp16 or int8, as the device profile prefers
    v = _pick_variant(report, precision)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = RecipeSpec.model_validate(manifest["recipe"])
    runtime = "tensorrt" if prof.preferred_runtime == "tensorrt" else "onnxruntime"
    model_src, trt_card = run_dir / v["artifact"], None
    if runtime == "tensorrt":
        model_src, trt_card = _tensorrt_model(run_dir, v, _export_artifacts(manifest).get(v["name"], {}), prof.name)
        exp = next((st for st in spec.stages if st.stage == "export"), None)
        t = exp.tensorrt if exp is not None else None
        trt_card.update({"precision": precision, "workspace_gb": t.workspace_gb if t else 1.0, "max_batch": t.max_batch if t else 8,
                         "opt_batch": t.opt_batch if t else 1, "max_seq_len": t.max_seq_len if t else None})
    dest = Path(out) if out else run_dir / "bundles" / prof.name
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(model_src, tmp / "model.onnx")
    kv_rel = _export_artifacts(manifest).get(v["name"], {}).get("kv_cache_path")
    if kv_rel and (run_dir / kv_rel).is_file():  # greedy decode runs on onnxruntime, whatever the full-sequence runtime
        shutil.copy2(run_dir / kv_rel, tmp / "model.kv.onnx")
    task = build_task(spec.task.model_dump())
    windows = np.concatenate(list(task.eval_batches(64))).astype(np.uint8)
    np.save(tmp / "eval_windows.npy", windows)
    card = {
        "version": 1, "model": "model.onnx", "variant": v["name"], "precision": v["precision"], "device": prof.name,
        "runtime": runtime, "threads": prof.threads, "seq_len": task.seq_len, "task": task.describe(), "tensorrt": trt_card,
        "kv_model": "model.kv.onnx" if (tmp / "model.kv.onnx").is_file() else None,
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
        + ("\n`model.kv.onnx` is the same model with a KV cache: `python3 run.py --generate 64` also measures greedy "
           "decode (prefill ms, ms per token, tokens/s) with onnxruntime.\n" if (tmp / "model.kv.onnx").is_file() else "")
        + ("\nWith TensorRT (JetPack) and torch present, the first run builds a TensorRT engine for this GPU "
           f"({precision}, profile batch 1..{trt_card['max_batch']}) and caches it as `model.<trt version>.<gpu>.engine`; "
           "later runs load it. Without them, run.py falls back to onnxruntime.\n" if runtime == "tensorrt" else "")
    ))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
