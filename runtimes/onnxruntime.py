"""ONNX Runtime sessions, prediction and benchmarking. ``onnxruntime`` is imported lazily."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsk_compress.errors import MissingBackendError
from dsk_compress.runtimes.base import BenchConfig, BenchResult, RuntimeBackendError, run_worker

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# ONNX tensor type strings as onnxruntime reports them -> numpy dtypes
_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingBackendError("onnxruntime", "onnx") from None
    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    return list(_ort().get_available_providers())


def make_session(
    path: str | os.PathLike,
    threads: int | None = None,
    optimization: str = "extended",
    providers: Sequence[str] | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    disabled_optimizers: Sequence[str] | None = None,
    config: dict[str, str] | None = None,
):
    """An ``onnxruntime.InferenceSession`` for the model at ``path``.

    ``threads``: intra-op threads (None: onnxruntime's default). ``optimization``: graph
    optimization level, one of ``disable|basic|extended|all``. ``providers``: execution providers
    in priority order (default ``["CPUExecutionProvider"]``); ones this build lacks raise.
    ``optimized_model_path``: where onnxruntime saves the optimized graph. ``disabled_optimizers``:
    names of graph transformers to turn off (e.g. ``["ConstantFolding"]``). ``config``: session config
    entries (``SessionOptions.add_session_config_entry``), e.g. where an optimized large graph writes its weights.
    """
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise RuntimeBackendError(f"ONNX model not found: {path}", hint="export the model first")
    if optimization not in OPTIMIZATION_LEVELS:
        raise RuntimeBackendError(
            f"unknown onnxruntime optimization level {optimization!r}", hint=f"valid: {', '.join(OPTIMIZATION_LEVELS)}"
        )
    if threads is not None and threads < 1:
        raise RuntimeBackendError(f"threads must be >= 1, got {threads}")
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    have = set(ort.get_available_providers())
    missing = [p for p in providers if p not in have]
    if missing:
        raise RuntimeBackendError(
            f"onnxruntime execution provider(s) not available: {', '.join(missing)}",
            hint=f"this onnxruntime build has: {', '.join(sorted(have))}",
        )

    level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3  # errors only
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if optimized_model_path is not None:
        Path(optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
        so.optimized_model_filepath = str(optimized_model_path)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    kwargs: dict[str, Any] = {}
    if disabled_optimizers:
        kwargs["disabled_optimizers"] = list(disabled_optimizers)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers, **kwargs)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise RuntimeBackendError(f"onnxruntime cannot load {path}: {e}") from None


def input_dtype(session, index: int = 0):
    """The numpy dtype of a session input (float32 if the type is not one numpy has)."""
    return _ORT_TYPES.get(session.get_inputs()[index].type, np.float32)


def session_predict(session) -> Callable[[np.ndarray], np.ndarray]:
    """A ``predict(x) -> np.ndarray`` that feeds ``x`` (cast to the input's type) to the first input
    and returns the first output as float32."""
    inp = session.get_inputs()[0]
    name = inp.name
    dtype = _ORT_TYPES.get(inp.type, np.float32)
    out_name = session.get_outputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(np.asarray(x).astype(dtype, copy=False))
        (y,) = session.run([out_name], {name: feed})
        return np.asarray(y).astype(np.float32, copy=False)

    return predict


def benchmark_onnx(
    path: str | os.PathLike,
    inputs: np.ndarray,
    cfg: BenchConfig | None = None,
    optimization: str = "extended",
    providers: Sequence[str] | None = None,
) -> BenchResult:
    """Time the ONNX model at ``path`` on ``inputs`` in a fresh worker process (see ``bench_worker``)."""
    cfg = cfg or BenchConfig()
    if optimization not in OPTIMIZATION_LEVELS:
        raise RuntimeBackendError(
            f"unknown onnxruntime optimization level {optimization!r}", hint=f"valid: {', '.join(OPTIMIZATION_LEVELS)}"
        )
    extra = ["--optimization", optimization]
    if providers:
        extra += ["--providers", ",".join(providers)]
    return run_worker("onnx", path, inputs, cfg, extra_args=extra)


ARM_MACHINES = ("aarch64", "arm64", "armv7l", "armv8l")


def provider_sets(profile_providers: Sequence[str], available: Sequence[str], machine: str) -> list[list[str]]:
    """The execution-provider lists to measure a model with on this machine, in order.

    Always ``[CPUExecutionProvider]`` first (the reference every device has); then, for each provider the
    device profile names and this onnxruntime build offers (CUDA, TensorRT, ...), plus XNNPACK on ARM when
    the build has it, that provider with the ones ONNX Runtime falls back to for nodes it does not take
    (TensorRT -> CUDA -> CPU, others -> CPU).

    Args:
        profile_providers: the device profile's ``execution_providers``.
        available: ``onnxruntime.get_available_providers()``.
        machine: ``platform.machine()``.
    """
    cpu = "CPUExecutionProvider"
    wanted = [p for p in profile_providers if p != cpu]
    if machine.lower() in ARM_MACHINES:
        wanted.append("XnnpackExecutionProvider")
    out = [[cpu]]
    for p in dict.fromkeys(wanted):
        if p not in available:
            continue
        chain = [p, "CUDAExecutionProvider", cpu] if p == "TensorrtExecutionProvider" else [p, cpu]
        out.append([q for q in dict.fromkeys(chain) if q in available])
    return out


def device_of(providers: Sequence[str]) -> str:
    """Where the first (highest-priority) execution provider runs the graph: ``cpu`` or ``cuda:0``."""
    first = providers[0] if providers else "CPUExecutionProvider"
    return "cuda:0" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
