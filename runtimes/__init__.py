"""Inference runtimes (onnxruntime, torch eager / compile, TensorRT), the shared benchmark method and its result schema.

Importing this package imports neither ``onnxruntime``, ``tensorrt`` nor ``torch``: each backend
is imported inside the functions that need it, and a missing optional backend raises
:class:`~dsk_compress.errors.MissingBackendError`.
"""

from __future__ import annotations

from dsk_compress.runtimes.base import BenchConfig, BenchmarkError, RuntimeBackendError, fit_batch, run_worker
from dsk_compress.runtimes.decode import benchmark_decode, measure_decode
from dsk_compress.runtimes.decoder import KVCacheSession
from dsk_compress.runtimes.onnxruntime import available_providers, benchmark_onnx, make_session, session_predict
from dsk_compress.runtimes.result import BenchRecord, BenchResult, DeviceResults, parse_record
from dsk_compress.runtimes.tensorrt import TensorRTSession, benchmark_tensorrt, build_engine, load_engine, trt_predict
from dsk_compress.runtimes.torch import benchmark_torch, load_hf_model, torch_forward

__all__ = [
    "BenchConfig",
    "BenchRecord",
    "BenchResult",
    "BenchmarkError",
    "DeviceResults",
    "KVCacheSession",
    "RuntimeBackendError",
    "TensorRTSession",
    "available_providers",
    "benchmark_decode",
    "benchmark_onnx",
    "benchmark_tensorrt",
    "benchmark_torch",
    "build_engine",
    "fit_batch",
    "load_engine",
    "load_hf_model",
    "make_session",
    "parse_record",
    "measure_decode",
    "run_worker",
    "session_predict",
    "torch_forward",
    "trt_predict",
]
