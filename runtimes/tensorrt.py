"""TensorRT engines (8.5 / 8.6, 10.x, 11): build from ONNX, run with torch CUDA buffers, benchmark.

Written against TensorRT's Python API: name-based I/O tensors (``num_io_tensors`` / ``get_tensor_name`` /
``set_tensor_address``) and ``execute_async_v3``, which exist from TensorRT 8.5 on; older releases are
refused with a clear message. What differs between releases (the ``EXPLICIT_BATCH`` network flag that
8.x needs and 10 ignores, strong typing from 9.x, precision flags gone in 11) is decided in
:mod:`dsk_compress.runtimes.trt_compat`, which the deploy bundle's ``run.py`` shares.
``tensorrt`` is imported lazily; when it is missing, :class:`MissingBackendError` names the
``tensorrt`` extra. Device buffers are torch CUDA tensors, so no pycuda/cuda-python is needed.

INT8 engines use *explicit* quantization: the ONNX model must carry QuantizeLinear /
DequantizeLinear nodes (implicit calibration is deprecated since TensorRT 10.1), int8 with zero
point 0 (``dsk_compress.export.trt_check`` checks that statically). Precision control: TensorRT 10
builds *weakly typed* networks by default, where ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` allow
the builder to pick those kernels; weak typing is deprecated from 10.12 and the flags are gone in
TensorRT 11, where networks are *strongly typed* (every tensor keeps the type the ONNX gives it:
an fp16 ONNX builds in fp16, Q/DQ pairs in int8, no flags). ``build_engine`` picks weak typing when
the flags exist and strong typing otherwise, unless told.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsk_compress.errors import ExportError, MissingBackendError
from dsk_compress.io import atomic_write_bytes
from dsk_compress.runtimes import trt_compat
from dsk_compress.runtimes.base import BenchConfig, BenchResult, RuntimeBackendError, run_worker

PRECISIONS = ("fp32", "fp16", "int8")

Shape = Sequence[int]


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingBackendError("tensorrt", "tensorrt") from None
    why = trt_compat.unsupported_reason(trt)
    if why:
        raise RuntimeBackendError(why, hint="pip install 'tensorrt>=8.5' (or the JetPack that ships it)")
    return trt


def _cuda_torch():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeBackendError(
            "TensorRT needs a CUDA GPU, but torch.cuda.is_available() is False", hint="run on a machine with an NVIDIA GPU"
        )
    return torch


def _torch_dtype(trt, torch, dt):
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
        "FP8": getattr(torch, "float8_e4m3fn", None),
    }
    for key, tdt in table.items():
        if tdt is not None and getattr(trt.DataType, key, None) == dt:
            return tdt
    raise RuntimeBackendError(f"TensorRT tensor type {dt} has no torch equivalent here")


def _make_logger(trt, verbose: bool = False):
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


# --------------------------------------------------------------------------- build


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    precision: str = "fp16",
    workspace_gb: float = 4.0,
    timing_cache_path: str | os.PathLike | None = None,
    profiles: Mapping[str, tuple[Shape, Shape, Shape]] | None = None,
    verbose: bool = False,
    strongly_typed: bool | None = None,
) -> Path:
    """Build a serialized TensorRT engine from an ONNX model and write it to ``engine_path``.

    ``precision``: ``fp32``, ``fp16`` (FP16 kernels allowed) or ``int8`` (explicit quantization:
    the ONNX must hold Q/DQ nodes; layers outside Q/DQ may use FP16). ``workspace_gb``: builder
    workspace pool limit. ``timing_cache_path``: a timing cache file that is loaded if present and
    written back after the build. ``profiles``: for each input with dynamic dims,
    ``(min_shape, opt_shape, max_shape)`` for one optimization profile. ``strongly_typed``: None
    picks strong typing for an fp16 ONNX built at ``fp16`` (its float32 islands, e.g. RMSNorm
    reductions, stay float32) and where this TensorRT has no precision flags (11+), and weak typing
    with precision flags otherwise (10.x: fp32 ONNX, Q/DQ int8 with FP16 allowed elsewhere);
    strong typing builds an ``fp16`` engine only from an fp16 ONNX.
    """
    trt = _trt()
    if precision not in PRECISIONS:
        raise ExportError(f"unknown TensorRT precision {precision!r}", hint=f"valid: {', '.join(PRECISIONS)}")
    if workspace_gb <= 0:
        raise ExportError(f"workspace_gb must be > 0, got {workspace_gb}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model not found: {onnx_path}", hint="export the model first")
    has_flags = trt_compat.has_precision_flags(trt)
    if strongly_typed is None:  # an fp16 ONNX says exactly what runs in fp16 (and which islands stay fp32): keep it
        strong = trt_compat.use_strong_typing(trt, precision, precision == "fp16" and _onnx_has_fp16(onnx_path))
    else:
        strong = bool(strongly_typed)
    if not strong and not has_flags:
        raise ExportError(
            f"TensorRT {trt.__version__} has no precision flags (weak typing was removed)", hint="build with strongly_typed=True"
        )
    if strong and not trt_compat.can_type_strongly(trt):
        raise ExportError(
            f"TensorRT {trt.__version__} cannot build strongly typed networks (9.x or later can)",
            hint="build with strongly_typed=False (precision flags)",
        )
    if strong and precision == "fp16" and not _onnx_has_fp16(onnx_path):
        raise ExportError(
            f"{onnx_path.name} holds no float16 tensors, so a strongly typed TensorRT network builds it in fp32",
            hint="export an fp16 ONNX first (export stage precisions: [fp32, fp16]) or build with precision='fp32'",
        )

    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(trt_compat.network_flags(trt, strong))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors[:5]) or 'unknown parser error'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "int8" and not _has_qdq(trt, network):
        raise ExportError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes, so TensorRT cannot build it in int8",
            hint="quantize it to QDQ ONNX first, or build with precision='fp16'",
        )
    trt_compat.set_precision_flags(trt, config, precision, strong)  # weak typing: INT8 lets the Q/DQ layers run in int8

    _add_profile(builder, network, config, profiles or {})

    cache = None
    if timing_cache_path is not None:
        cache = _load_timing_cache(config, Path(timing_cache_path))
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}", hint="rerun with verbose=True to see the builder log")
    out = atomic_write_bytes(engine_path, bytes(serialized))
    if cache is not None:
        atomic_write_bytes(timing_cache_path, bytes(cache.serialize()))  # the builder updated it in place
    return out


def lm_profiles(input_name: str, seq_len: int, max_batch: int = 8, opt_batch: int = 1) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimization profile of a causal LM with ``input_ids [batch, sequence]`` both dynamic."""
    if not 1 <= opt_batch <= max_batch or seq_len < 1:
        raise ExportError(
            f"bad TensorRT profile: need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch}) and seq_len >= 1 ({seq_len})"
        )
    return {input_name: ((1, 1), (opt_batch, seq_len), (max_batch, seq_len))}


def tensorrt_status() -> tuple[bool, str]:
    """``(True, version)`` when an engine can be built here (tensorrt importable and a CUDA GPU), else ``(False, why)``."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed on the build host"
    import torch

    if not torch.cuda.is_available():
        return False, "the build host has no CUDA GPU"
    return True, _trt().__version__


def _onnx_has_fp16(path: Path) -> bool:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)


def _has_qdq(trt, network) -> bool:
    kinds = {getattr(trt.LayerType, k, None) for k in ("QUANTIZE", "DEQUANTIZE")} - {None}
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def _add_profile(builder, network, config, profiles: Mapping[str, tuple[Shape, Shape, Shape]]) -> None:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = sorted(set(profiles) - set(inputs))
    if unknown:
        raise ExportError(f"profiles name unknown input(s): {', '.join(unknown)}", hint=f"network inputs: {', '.join(inputs)}")
    dynamic = sorted(n for n, s in inputs.items() if any(d < 0 for d in s))
    missing = [n for n in dynamic if n not in profiles]
    if missing:
        raise ExportError(
            "input(s) with dynamic dims need a (min, opt, max) shape profile: " + ", ".join(f"{n}{list(inputs[n])}" for n in missing),
        )
    if not profiles:
        return
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        if len(shapes) != 3:
            raise ExportError(f"profile for {name!r} must be (min_shape, opt_shape, max_shape)")
        mn, opt, mx = (tuple(int(d) for d in s) for s in shapes)
        want = inputs[name]
        for s in (mn, opt, mx):
            if len(s) != len(want) or any(w >= 0 and w != d for w, d in zip(want, s)):
                raise ExportError(f"profile shape {list(s)} for {name!r} does not fit its declared shape {list(want)}")
        if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
            raise ExportError(f"profile for {name!r} needs min <= opt <= max in every dim, got {list(mn)}, {list(opt)}, {list(mx)}")
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)


def _load_timing_cache(config, path: Path):
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None and blob:  # corrupt or from another TensorRT version: start fresh
        cache = config.create_timing_cache(b"")
    return cache


# --------------------------------------------------------------------------- run


class TensorRTSession:
    """A deserialized engine plus one execution context, run on its own CUDA stream.

    ``infer`` takes host arrays or torch tensors by input name and returns host numpy arrays;
    calling the session feeds the first input and returns the first output as float32.
    """

    def __init__(self, engine_path: str | os.PathLike, device: int = 0, verbose: bool = False) -> None:
        trt = _trt()
        torch = _cuda_torch()
        self._trt, self._torch = trt, torch
        path = Path(engine_path)
        if not path.is_file():
            raise RuntimeBackendError(f"TensorRT engine not found: {path}", hint="build it with build_engine()")
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        # the logger and runtime must outlive the engine
        self.logger = _make_logger(trt, verbose)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeBackendError(
                f"TensorRT cannot deserialize {path}",
                hint="engines only load with the TensorRT version and GPU model they were built for; rebuild it here",
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeBackendError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        self.stream = torch.cuda.Stream(device=self.device)
        self.input_names, self.output_names = trt_compat.io_names(trt, self.engine)
        self.dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in self.input_names + self.output_names}
        self._outputs: dict[str, Any] = {}
        self._inputs: dict[str, Any] = {}

    def _device_input(self, name: str, x):
        torch = self._torch
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.to(device=self.device, dtype=self.dtypes[name], non_blocking=False).contiguous()

    def _output_buffer(self, name: str, shape: tuple[int, ...]):
        buf = self._outputs.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self._outputs[name] = buf
        return buf

    def infer_device(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on ``feeds`` and return the output torch CUDA tensors (valid until the next call)."""
        torch = self._torch
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise RuntimeBackendError(f"missing TensorRT input(s): {', '.join(missing)}", hint=f"inputs: {', '.join(self.input_names)}")
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                self._inputs[name] = self._device_input(name, feeds[name])  # kept alive while the engine reads it
            shapes = {n: tuple(t.shape) for n, t in self._inputs.items() if n in self.input_names}
            for name, shape in shapes.items():  # output shapes follow from the input shapes
                if not self.context.set_input_shape(name, shape):
                    raise RuntimeBackendError(f"input {name!r} shape {list(shape)} is outside the engine's optimization profile")
            addresses = {n: self._inputs[n].data_ptr() for n in self.input_names}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeBackendError(
                        f"output {name!r} has a data-dependent shape {list(shape)}, which this runtime does not support"
                    )
                addresses[name] = self._output_buffer(name, shape).data_ptr()
            try:
                trt_compat.execute(self.context, addresses, shapes, self.stream.cuda_stream)
            except RuntimeError as e:
                raise RuntimeBackendError(str(e)) from None
        self.stream.synchronize()
        return {n: self._outputs[n] for n in self.output_names}

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (input name -> array) and return host numpy outputs by name."""
        out = self.infer_device(feeds)
        return {n: t.cpu().numpy() if t.dtype != self._torch.bfloat16 else t.float().cpu().numpy() for n, t in out.items()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.infer_device({self.input_names[0]: x})
        return out[self.output_names[0]].float().cpu().numpy()

    @property
    def device_memory_bytes(self) -> int | None:
        """Scratch device memory the engine needs per context (None if this TensorRT does not say)."""
        return trt_compat.device_memory_bytes(self.engine)

    @property
    def gpu_name(self) -> str:
        return self._torch.cuda.get_device_name(self.device)


def load_engine(engine_path: str | os.PathLike, device: int = 0) -> TensorRTSession:
    """A :class:`TensorRTSession` for a serialized engine file."""
    return TensorRTSession(engine_path, device=device)


def trt_predict(engine_path: str | os.PathLike, device: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A ``predict(x) -> np.ndarray`` (first input in, first output out as float32)."""
    return TensorRTSession(engine_path, device=device)


def benchmark_tensorrt(engine_path: str | os.PathLike, inputs: np.ndarray, cfg: BenchConfig | None = None, device: int = 0) -> BenchResult:
    """Time a TensorRT engine in a fresh worker process.

    Latency is host-to-host per run (H2D copy, execute, D2H copy, synchronize).
    ``peak_memory_mb`` is the worker's peak host RSS; GPU memory goes in ``extra``.
    """
    _trt()  # fail fast with MissingBackendError here rather than in the worker
    cfg = cfg or BenchConfig()
    return run_worker("tensorrt", engine_path, inputs, cfg, extra_args=["--device-index", str(device)])
