"""Benchmark one model in this process and write the timings as JSON.

    python -m dsk_compress.runtimes.bench_worker --kind onnx --model M.onnx --inputs X.npy \\
        --warmup 5 --runs 30 [--threads 4] --out RESULT.json

Run by :func:`dsk_compress.runtimes.base.run_worker` in a fresh process per model, so
``peak_memory_mb`` (VmHWM of this process) is the real peak RSS of a process that loaded
and ran exactly that model. Only the chosen backend is imported.

Kinds: ``onnx`` (an .onnx file, onnxruntime), ``torch`` (a Hugging Face model directory, eager
PyTorch on CPU), ``tensorrt`` (a serialized TensorRT engine).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

KINDS = ("onnx", "torch", "tensorrt")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this reads VmHWM from /proc/self/status: ``ru_maxrss`` would carry over the parent's
    peak through fork + exec and report the launcher's memory instead of this worker's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _load_onnx(args) -> tuple[Callable[[np.ndarray], Any], dict]:
    from dsk_compress.runtimes.onnxruntime import device_of, make_session, session_predict

    providers = args.providers.split(",") if args.providers else None
    sess = make_session(args.model, threads=args.threads, optimization=args.optimization, providers=providers)
    used = list(sess.get_providers())
    import onnxruntime

    info = {
        "runtime": "onnxruntime",
        "device": device_of(used),
        "providers": used,
        "notes": f"onnxruntime {onnxruntime.__version__}, graph optimization {args.optimization}",
    }
    return session_predict(sess), info


def _load_torch(args) -> tuple[Callable[[np.ndarray], Any], dict]:
    import torch

    from dsk_compress.runtimes.torch import RUNTIME_NAME, load_hf_model, torch_forward

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_hf_model(args.model, dtype=args.dtype)
    info = {
        "runtime": RUNTIME_NAME,
        "device": "cpu",
        "providers": [],
        "notes": f"torch {torch.__version__} eager, {args.dtype}, {torch.get_num_threads()} threads, {type(model).__name__}",
    }
    return torch_forward(model), info


def _load_tensorrt(args) -> tuple[Callable[[np.ndarray], Any], dict]:
    from dsk_compress.runtimes.tensorrt import RUNTIME_NAME, TensorRTSession

    sess = TensorRTSession(args.model, device=args.device_index)  # MissingBackendError without tensorrt
    import tensorrt
    info = {
        "runtime": RUNTIME_NAME,
        "device": f"cuda:{args.device_index} ({sess.gpu_name})",
        "providers": [],
        "notes": f"TensorRT {tensorrt.__version__}; host-to-host latency (H2D copy, execute, D2H copy)",
        "extra": {"engine_device_memory_mb": (sess.device_memory_bytes or 0) / (1 << 20)},
    }
    return sess, info


def run(args) -> dict:
    x = np.load(args.inputs, allow_pickle=False)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    predict, info = {"onnx": _load_onnx, "torch": _load_torch, "tensorrt": _load_tensorrt}[args.kind](args)
    load_ms = (time.perf_counter() - t0) * 1000

    y = None
    for _ in range(args.warmup):
        y = predict(x)
    times_ms = []
    perf = time.perf_counter
    for _ in range(args.runs):
        t = perf()
        y = predict(x)
        times_ms.append((perf() - t) * 1000.0)

    extra = dict(info.pop("extra", {}))
    extra.update(load_ms=load_ms, rss_before_load_mb=rss_before)
    if y is not None:
        extra.update(output_shape=list(np.shape(y)), output_dtype=str(np.asarray(y).dtype))
    if args.kind == "tensorrt":
        import torch

        extra["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / (1 << 20)
    return {
        "kind": args.kind,
        "model": str(args.model),
        "input_shape": list(x.shape),
        "input_dtype": str(x.dtype),
        "warmup": args.warmup,
        "runs": args.runs,
        "threads": args.threads,
        "times_ms": times_ms,
        "peak_memory_mb": peak_rss_mb(),
        **info,
        "extra": extra,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsk_compress.runtimes.bench_worker", description=__doc__.splitlines()[0])
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--model", required=True, help=".onnx file, Hugging Face model directory or TensorRT engine")
    p.add_argument("--inputs", required=True, help=".npy array fed to the model's first input")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="where to write the result JSON")
    p.add_argument("--optimization", default="extended", choices=("disable", "basic", "extended", "all"), help="onnx only")
    p.add_argument("--providers", default=None, help="onnx only: comma-separated execution providers")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="torch only")
    p.add_argument("--device-index", type=int, default=0, help="tensorrt only: CUDA device")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from dsk_compress.errors import DskError
    from dsk_compress.io import atomic_write_json

    args = parse_args(argv)
    try:
        result = run(args)
    except DskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
