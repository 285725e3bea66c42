"""Benchmark one model in this process with the shared method and write the result as JSON.

    python -m dsk_compress.runtimes.bench_worker --kind onnx --model M.onnx --inputs X.npy \\
        --batches 1,8,64 --warmup 5 --runs 30 [--duration 10] [--threads 4] [--seq-len 256] --out RESULT.json

Run by :func:`dsk_compress.runtimes.base.run_worker` in a fresh process per model, so the peak memory
(VmHWM of this process) is the real peak RSS of a process that loaded and ran exactly that model. Only
the chosen backend is imported. The timing is :func:`dsk_compress.runtimes.measure.time_model`, the
method a deploy bundle's ``run.py`` uses too; the JSON holds the ``runtime``, ``timing`` and ``memory``
sections of a :class:`~dsk_compress.runtimes.result.BenchRecord`.

Kinds:

- ``onnx``: an .onnx file in ONNX Runtime with the given execution providers (CPU by default).
- ``torch``: a Hugging Face model directory in PyTorch, eager or ``torch.compile``, on the CPU or CUDA,
  in float32 / bfloat16 / float16. On CUDA the inputs are copied to the GPU once and each run ends with a
  synchronisation (device latency, no host copies per run).
- ``tensorrt``: a serialized TensorRT engine (8.5 or later), inputs on the GPU, synchronised per run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dsk_compress.runtimes.measure import peak_rss_mb, time_model

KINDS = ("onnx", "torch", "tensorrt")

__all__ = ["KINDS", "main", "peak_rss_mb", "run"]


def _load_onnx(args) -> tuple[Callable[[np.ndarray], Any], dict]:
    import onnxruntime

    from dsk_compress.runtimes.onnxruntime import device_of, make_session, session_predict

    providers = args.providers.split(",") if args.providers else None
    sess = make_session(args.model, threads=args.threads, optimization=args.optimization, providers=providers)
    used = list(sess.get_providers())
    info = {
        "name": "onnxruntime",
        "version": onnxruntime.__version__,
        "mode": args.optimization,
        "execution_provider": used[0],
        "providers": used,
        "device": device_of(used),
        "threads": args.threads,
    }
    return session_predict(sess), info


def _load_torch(args) -> tuple[Callable[[np.ndarray], Any], dict]:
    import torch

    from dsk_compress.runtimes.torch import load_hf_model, torch_device_forward

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_hf_model(args.model, dtype=args.dtype, device=args.device)
    predict = torch_device_forward(model, args.device, compile=args.compile)
    info = {
        "name": "torch",
        "version": torch.__version__.split("+")[0],
        "mode": "compile" if args.compile else "eager",
        "device": "cuda:0" if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
    }
    return predict, info


def _load_tensorrt(args) -> tuple[Callable[[np.ndarray], Any], dict]:
    from dsk_compress.runtimes.tensorrt import TensorRTSession
    from dsk_compress.runtimes.torch import gpu_resident

    sess = TensorRTSession(args.model, device=args.device_index)  # MissingBackendError without tensorrt
    import tensorrt

    name = sess.input_names[0]
    info = {
        "name": "tensorrt",
        "version": tensorrt.__version__,
        "device": f"cuda:{args.device_index}",
        "extra_memory": {"engine_device_memory_mb": (sess.device_memory_bytes or 0) / (1 << 20)},
    }
    return gpu_resident(lambda t: sess.infer_device({name: t}), sess.device), info


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(0)


def run(args) -> dict:
    """Load the model, time it with :func:`~dsk_compress.runtimes.measure.time_model`, return the JSON sections."""
    x = np.load(args.inputs, allow_pickle=False)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    predict, info = {"onnx": _load_onnx, "torch": _load_torch, "tensorrt": _load_tensorrt}[args.kind](args)
    session_ms = (time.perf_counter() - t0) * 1000
    timing = time_model(predict, x, args.batches, args.warmup, args.runs, args.duration, seq_len=args.seq_len)
    timing["session_ms"] = session_ms
    memory = {"peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss_before, **info.pop("extra_memory", {})}
    if info["device"].startswith("cuda"):
        import torch

        memory["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / (1 << 20)
    return {"runtime": info, "timing": timing, "memory": memory, "gpu": _gpu_name(info["device"])}


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of batch sizes: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsk_compress.runtimes.bench_worker", description=__doc__.splitlines()[0])
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--model", required=True, help=".onnx file, Hugging Face model directory or TensorRT engine")
    p.add_argument("--inputs", required=True, help=".npy array fed to the model's first input")
    p.add_argument("--batches", type=_batches, default=[1], help="batch sizes: the first is the latency batch (default 1)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--duration", type=float, default=None, help="time each batch size for this many seconds instead of --runs runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per item, for tokens/s")
    p.add_argument("--out", required=True, help="where to write the result JSON")
    p.add_argument("--optimization", default="extended", choices=("disable", "basic", "extended", "all"), help="onnx only")
    p.add_argument("--providers", default=None, help="onnx only: comma-separated execution providers")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="torch only")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch only")
    p.add_argument("--compile", action="store_true", help="torch only: torch.compile the model")
    p.add_argument("--device-index", type=int, default=0, help="tensorrt only: CUDA device")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be > 0")
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
