"""Runtimes: onnxruntime sessions, isolated benchmarks, eager torch and the TensorRT backend."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from dsk_compress.errors import DskError, MissingBackendError
from dsk_compress.runtimes import (
    BenchConfig,
    BenchmarkError,
    BenchResult,
    RuntimeBackendError,
    benchmark_onnx,
    benchmark_torch,
    fit_batch,
    make_session,
    session_predict,
)
from dsk_compress.runtimes.measure import latency_stats

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """A tiny torch Linear model and its ONNX export (dynamic batch)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    path = tmp_path_factory.mktemp("onnx") / "linear.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(
            model,
            (torch.randn(2, 8),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            dynamo=False,
        )
    return model, path


def _torch_out(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------- pure helpers


def test_latency_stats_computes_percentiles_and_throughput():
    r = latency_stats([1.0, 2.0, 3.0, 4.0], batch_size=2, seq_len=10)
    assert r["p50"] == pytest.approx(2.5) and r["mean"] == pytest.approx(2.5)
    assert (r["min"], r["max"], r["runs"], r["batch_size"]) == (1.0, 4.0, 4, 2)
    assert r["items_per_s"] == pytest.approx(2 * 1000 / 2.5)
    assert r["tokens_per_s"] == pytest.approx(10 * 2 * 1000 / 2.5)


def test_bench_config_rejects_zero_runs():
    with pytest.raises(ValueError, match="runs"):
        BenchConfig(runs=0)


def test_fit_batch_tiles_rows_to_batch_size():
    x = np.arange(6).reshape(2, 3)
    y = fit_batch(x, 5)
    assert y.shape == (5, 3)
    np.testing.assert_array_equal(y[2], x[0])
    assert fit_batch(x, 2) is x


# --------------------------------------------------------------------------- onnxruntime


def test_session_predict_matches_torch(linear):
    model, path = linear
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    predict = session_predict(make_session(path, threads=1))
    y = predict(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, _torch_out(model, x), atol=1e-5)


def test_session_predict_casts_input_dtype(linear):
    model, path = linear
    x = np.ones((1, 8), dtype=np.float64)
    y = session_predict(make_session(path, optimization="disable"))(x)
    np.testing.assert_allclose(y, _torch_out(model, x.astype(np.float32)), atol=1e-5)


def test_make_session_unknown_optimization_raises(linear):
    with pytest.raises(DskError, match="optimization level"):
        make_session(linear[1], optimization="max")


def test_make_session_unavailable_provider_raises(linear):
    with pytest.raises(DskError, match="NoSuchExecutionProvider"):
        make_session(linear[1], providers=["NoSuchExecutionProvider"])


def test_make_session_missing_file_raises(tmp_path):
    with pytest.raises(RuntimeBackendError, match="not found"):
        make_session(tmp_path / "none.onnx")


def test_make_session_writes_optimized_model(linear, tmp_path):
    out = tmp_path / "opt" / "linear.opt.onnx"
    make_session(linear[1], optimization="basic", optimized_model_path=out, disabled_optimizers=["ConstantFolding"])
    assert out.is_file()


def test_benchmark_onnx_reports_ordered_percentiles(linear):
    cfg = BenchConfig(warmup=2, runs=12, batch_size=1, threads=1)
    r = benchmark_onnx(linear[1], np.zeros((1, 8), np.float32), cfg)
    assert isinstance(r, BenchResult)
    assert 0 < r.p50 <= r.p90 <= r.p99
    assert r.runs == cfg.runs
    assert r.peak_memory_mb is not None and r.peak_memory_mb > 0
    assert r.throughput == pytest.approx(cfg.batch_size * 1000 / r.mean)
    assert (r.runtime.name, r.runtime.short, r.device) == ("onnxruntime", "onnxruntime-cpu", "cpu")
    assert r.runtime.providers == ["CPUExecutionProvider"] and r.runtime.threads == 1
    assert r.timing.session_ms > 0 and r.timing.first_inference_ms > 0 and r.timing.warmup == 2
    # the worker ran the model once it had loaded it: peak RSS is at least the pre-load RSS
    assert r.peak_memory_mb >= r.memory.rss_before_load_mb


def test_benchmark_onnx_fits_inputs_to_batch_size(linear):
    r = benchmark_onnx(linear[1], np.zeros((1, 8), np.float32), BenchConfig(warmup=0, runs=2, batch_size=3, threads=1))
    assert r.timing.output_shape == [3, 4] and r.timing.input_shape == [8]
    assert r.batch_size == 3


def test_benchmark_onnx_measures_throughput_batches(linear):
    r = benchmark_onnx(linear[1], np.zeros((1, 8), np.float32), BenchConfig(warmup=1, runs=4, throughput_batches=(8, 64), threads=1))
    assert [b.batch_size for b in r.timing.batches] == [1, 8, 64] and r.timing.skipped == []
    for b in r.timing.batches:
        assert 1 <= b.runs <= 4 and b.items_per_s == pytest.approx(b.batch_size * 1000 / b.mean)


def test_time_model_skips_a_batch_the_model_refuses_and_one_too_large(tmp_path):
    import torch

    from dsk_compress.runtimes.measure import time_model

    path = tmp_path / "fixed.onnx"  # a fixed batch axis of 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            torch.nn.Linear(8, 4).eval(), (torch.randn(1, 8),), str(path), input_names=["x"], output_names=["y"], dynamo=False
        )
    predict = session_predict(make_session(path, threads=1))
    t = time_model(predict, np.zeros((1, 8), np.float32), (1, 8), warmup=1, runs=3)
    assert [b["batch_size"] for b in t["batches"]] == [1] and t["batches"][0]["runs"] == 3
    assert t["skipped"][0]["batch_size"] == 8 and "invalid dimensions for input: x" in t["skipped"][0]["reason"]
    # 16 bytes of output per item: batch 64 would be 1024 bytes, over a 1000-byte limit
    t = time_model(lambda x: np.zeros((len(x), 4), np.float32), np.zeros((1, 8)), (1, 8, 64), warmup=0, runs=2, max_output_bytes=1000)
    assert [b["batch_size"] for b in t["batches"]] == [1, 8] and t["skipped"][0]["batch_size"] == 64
    assert "its output would take" in t["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="batch sizes"):
        time_model(predict, np.zeros((1, 8), np.float32), (0,))


def test_time_model_by_duration_times_at_least_one_run():
    from dsk_compress.runtimes.measure import time_model

    t = time_model(lambda x: x, np.zeros((1, 2)), (1,), warmup=0, runs=1, duration_s=0.02)
    assert t["runs"] is None and t["duration_s"] == 0.02 and t["batches"][0]["runs"] >= 1


def test_benchmark_onnx_runs_worker_with_argument_list(linear, monkeypatch):
    import dsk_compress.runtimes.base as base

    seen = {}
    real_run = subprocess.run

    def spy(cmd, *a, **kw):
        seen["cmd"], seen["kw"] = cmd, kw
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(base.subprocess, "run", spy)
    benchmark_onnx(linear[1], np.zeros((1, 8), np.float32), BenchConfig(warmup=0, runs=1, threads=1))
    assert isinstance(seen["cmd"], list)
    assert seen["cmd"][:3] == [sys.executable, "-m", "dsk_compress.runtimes.bench_worker"]
    assert not seen["kw"].get("shell", False)


def test_benchmark_onnx_corrupt_model_raises_with_stderr_tail(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(BenchmarkError) as ei:
        benchmark_onnx(bad, np.zeros((1, 8), np.float32), BenchConfig(warmup=0, runs=1))
    assert isinstance(ei.value, DskError)
    assert "cannot load" in str(ei.value)


def test_benchmark_onnx_missing_model_raises(tmp_path):
    with pytest.raises(RuntimeBackendError, match="not found"):
        benchmark_onnx(tmp_path / "gone.onnx", np.zeros((1, 8), np.float32), BenchConfig(runs=1))


def test_bench_worker_writes_result_json(linear, tmp_path):
    from dsk_compress.runtimes import bench_worker

    inputs, out = tmp_path / "x.npy", tmp_path / "r.json"
    np.save(inputs, np.zeros((2, 8), np.float32))
    rc = bench_worker.main(
        [
            "--kind",
            "onnx",
            "--model",
            str(linear[1]),
            "--inputs",
            str(inputs),
            "--batches",
            "1,2",
            "--warmup",
            "1",
            "--runs",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert [b["runs"] for b in data["timing"]["batches"]] == [3, 3] and data["memory"]["peak_rss_mb"] > 0
    assert data["timing"]["input_shape"] == [8] and data["runtime"]["execution_provider"] == "CPUExecutionProvider"
    BenchResult.model_validate(data)  # the layout the driver reads


def test_import_runtimes_does_not_import_backends():
    code = (
        "import sys, dsk_compress.runtimes, dsk_compress.devices; print(sorted(m for m in ('onnxruntime', 'tensorrt') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- eager torch


def test_benchmark_torch_runs_hf_model_dir(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m", safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 32, size=(1, 8), dtype=np.int64)
    r = benchmark_torch(tmp_path / "m", ids, BenchConfig(warmup=1, runs=3, threads=1))
    assert r.runtime.short == "torch-eager-cpu" and r.device == "cpu" and r.runtime.dtype == "float32"
    assert r.runs == 3 and r.p50 <= r.p90 <= r.p99
    assert r.peak_memory_mb > 0
    assert r.timing.output_shape == [1, 8, 32]


def test_benchmark_torch_non_model_dir_raises(tmp_path):
    with pytest.raises(RuntimeBackendError, match="config.json"):
        benchmark_torch(tmp_path, np.zeros((1, 4), np.int64), BenchConfig(warmup=0, runs=1))


# --------------------------------------------------------------------------- TensorRT


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_tensorrt_missing_backend_raises_missing_backend_error(linear, tmp_path):
    from dsk_compress.runtimes.tensorrt import TensorRTSession, benchmark_tensorrt, build_engine

    for call in (
        lambda: build_engine(linear[1], tmp_path / "e.plan"),
        lambda: TensorRTSession(tmp_path / "e.plan"),
        lambda: benchmark_tensorrt(tmp_path / "e.plan", np.zeros((1, 8), np.float32), BenchConfig(runs=1)),
    ):
        with pytest.raises(MissingBackendError) as ei:
            call()
        assert ei.value.backend == "tensorrt" and ei.value.extra == "tensorrt"
        assert "dsk-compress[tensorrt]" in str(ei.value)


def _needs_trt_gpu():
    if not HAS_TRT:
        pytest.skip("tensorrt is not installed")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_fp16_engine_matches_torch(linear, tmp_path):
    _needs_trt_gpu()
    from dsk_compress.runtimes.tensorrt import build_engine, trt_predict

    model, path = linear
    engine = build_engine(
        path,
        tmp_path / "linear.plan",
        precision="fp16",
        workspace_gb=0.5,
        timing_cache_path=tmp_path / "timing.cache",
        profiles={"x": ((1, 8), (4, 8), (16, 8))},
    )
    assert engine.is_file() and (tmp_path / "timing.cache").is_file()
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    y = trt_predict(engine)(x)
    np.testing.assert_allclose(y, _torch_out(model, x), atol=2e-2, rtol=2e-2)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_dynamic_input_without_profile_raises(linear, tmp_path):
    _needs_trt_gpu()
    from dsk_compress.errors import ExportError
    from dsk_compress.runtimes.tensorrt import build_engine

    with pytest.raises(ExportError, match="profile"):
        build_engine(linear[1], tmp_path / "e.plan")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_int8_without_qdq_raises(linear, tmp_path):
    _needs_trt_gpu()
    from dsk_compress.errors import ExportError
    from dsk_compress.runtimes.tensorrt import build_engine

    with pytest.raises(ExportError, match="QuantizeLinear"):
        build_engine(linear[1], tmp_path / "e.plan", precision="int8", profiles={"x": ((1, 8), (1, 8), (1, 8))})


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_benchmark_reports_ordered_percentiles(linear, tmp_path):
    _needs_trt_gpu()
    from dsk_compress.runtimes.tensorrt import benchmark_tensorrt, build_engine

    engine = build_engine(linear[1], tmp_path / "e.plan", workspace_gb=0.5, profiles={"x": ((1, 8), (1, 8), (4, 8))})
    r = benchmark_tensorrt(engine, np.zeros((1, 8), np.float32), BenchConfig(warmup=2, runs=10, throughput_batches=(4, 64)))
    assert r.runtime.name == "tensorrt" and r.runs == 10 and r.p50 <= r.p90 <= r.p99
    assert [b.batch_size for b in r.timing.batches] == [1, 4] and r.timing.skipped[0].batch_size == 64  # outside the profile
    assert r.memory.gpu_peak_mb > 0 and r.gpu


# --------------------------------------------------------------------------- execution providers


def test_provider_sets_cpu_first_then_each_offered_profile_provider_with_its_fallbacks():
    from dsk_compress.runtimes.onnxruntime import device_of, provider_sets

    gpu_profile = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    full = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"]
    assert provider_sets(gpu_profile, full, "x86_64") == [
        ["CPUExecutionProvider"],
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
    ]
    # a CPU-only build on a GPU server: the CPU alone; XNNPACK only on ARM and only when the build has it
    assert provider_sets(gpu_profile, ["CPUExecutionProvider"], "x86_64") == [["CPUExecutionProvider"]]
    assert provider_sets(["CPUExecutionProvider"], full, "aarch64") == [
        ["CPUExecutionProvider"],
        ["XnnpackExecutionProvider", "CPUExecutionProvider"],
    ]
    assert provider_sets(["CPUExecutionProvider"], ["CPUExecutionProvider"], "aarch64") == [["CPUExecutionProvider"]]
    assert [device_of(p) for p in provider_sets(gpu_profile, full, "x86_64")] == ["cpu", "cuda:0", "cuda:0"]


# --------------------------------------------------------------------------- torch on CUDA


def _needs_cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


def test_benchmark_torch_cuda_is_refused_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeBackendError, match="needs a CUDA GPU"):
        benchmark_torch(tmp_path, np.zeros((1, 4), np.int64), BenchConfig(runs=1), dtype="bfloat16", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_benchmark_torch_cuda_bf16_eager_and_compiled(tmp_path, compile):
    _needs_cuda()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m", safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 32, size=(1, 8), dtype=np.int64)
    r = benchmark_torch(
        tmp_path / "m", ids, BenchConfig(warmup=1, runs=3, throughput_batches=(64,)), dtype="bfloat16", device="cuda", compile=compile
    )
    assert r.runtime.short == ("torch-compile-cuda-bf16" if compile else "torch-eager-cuda-bf16") and r.device == "cuda:0"
    assert [b.batch_size for b in r.timing.batches] == [1, 64] and r.memory.gpu_peak_mb > 0 and r.gpu


# --------------------------------------------------------------------------- TensorRT version dispatch (fake modules)


def fake_trt(version: str, strong: bool | None = None, flags: bool | None = None):
    """A stand-in ``tensorrt`` module of ``version`` with the parts build_engine and trt_compat touch, recording calls."""
    import types

    major = int(version.split(".")[0])
    strong = major >= 9 if strong is None else strong
    flags = major < 11 if flags is None else flags
    calls: dict = {"flags": [], "networks": []}
    m = types.SimpleNamespace(__version__=version, calls=calls)
    creation = {"EXPLICIT_BATCH": 0} if major < 11 else {}
    if strong:
        creation["STRONGLY_TYPED"] = 1
    m.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
    m.BuilderFlag = types.SimpleNamespace(**({"FP16": "FP16", "INT8": "INT8"} if flags else {}))
    m.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    m.LayerType = types.SimpleNamespace(QUANTIZE="Q", DEQUANTIZE="DQ")
    m.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    m.Logger = type("Logger", (), {"WARNING": 1, "VERBOSE": 0, "__init__": lambda self, level: None})

    class Config:
        def set_memory_pool_limit(self, *a):
            pass

        def set_flag(self, f):
            calls["flags"].append(f)

        def add_optimization_profile(self, p):
            calls["profile"] = p.shapes

        def create_timing_cache(self, blob):
            return None

        def set_timing_cache(self, *a):
            pass

    class Network:
        def __init__(self, f):
            self.creation_flags, self.num_layers, self.num_inputs = f, 0, 1

        def get_input(self, i):
            return types.SimpleNamespace(name="x", shape=(-1, 8))

    class Profile:
        shapes: dict = {}

        def set_shape(self, name, *s):
            self.shapes[name] = s

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, f):
            calls["networks"].append(f)
            return Network(f)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"plan"

    m.Builder = Builder
    m.OnnxParser = lambda network, logger: types.SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    return m


@pytest.mark.parametrize("version, want_flags", [("8.6.1.6", 1), ("10.3.0", 0)])
def test_build_engine_network_flags_per_tensorrt_version(linear, tmp_path, monkeypatch, version, want_flags):
    from dsk_compress.runtimes.tensorrt import build_engine

    trt = fake_trt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    build_engine(linear[1], tmp_path / "e.plan", precision="fp16", profiles={"x": ((1, 8), (2, 8), (4, 8))})
    # 8.x: EXPLICIT_BATCH (bit 0), or the ONNX parser gets an implicit-batch network; 10: create_network(0)
    assert trt.calls["networks"] == [want_flags] and trt.calls["flags"] == ["FP16"]
    assert (tmp_path / "e.plan").read_bytes() == b"plan" and trt.calls["profile"]["x"] == ((1, 8), (2, 8), (4, 8))


def test_build_engine_refuses_fp16_from_fp32_onnx_where_only_strong_typing_exists(linear, tmp_path, monkeypatch):
    from dsk_compress.errors import ExportError
    from dsk_compress.runtimes.tensorrt import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("11.0.0"))
    with pytest.raises(ExportError, match="holds no float16 tensors"):
        build_engine(linear[1], tmp_path / "e.plan", precision="fp16", profiles={"x": ((1, 8), (1, 8), (1, 8))})


def test_tensorrt_older_than_8_5_is_refused_with_the_version_it_needs(linear, tmp_path, monkeypatch):
    from dsk_compress.runtimes.tensorrt import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("8.4.3.1", strong=False))
    with pytest.raises(RuntimeBackendError, match=r"TensorRT 8.4.3.1 predates the name-based tensor API .*8\.5"):
        build_engine(linear[1], tmp_path / "e.plan")


def test_trt_compat_dispatch_on_fake_modules():
    from dsk_compress.runtimes import trt_compat as tc

    t8, t86_strongless, t10, t11 = fake_trt("8.5.2"), fake_trt("8.6.1", strong=False), fake_trt("10.0.1"), fake_trt("11.1.0")
    assert tc.version_tuple(fake_trt("10.13.0.35")) == (10, 13) and tc.version_tuple(fake_trt("8.6.1.post1")) == (8, 6)
    assert tc.network_flags(t8, False) == 1 and tc.network_flags(t10, False) == 0 and tc.network_flags(t11, True) == 2
    assert tc.network_flags(t10, True) == 2
    for old in (t8, t86_strongless):  # strong typing came with 9.x
        with pytest.raises(RuntimeError, match="cannot build strongly typed"):
            tc.network_flags(old, True)
    # weak typing with precision flags where they exist; an fp16 ONNX at fp16 keeps its fp16 / fp32 split (strong)
    assert not tc.use_strong_typing(t10, "int8", False) and tc.use_strong_typing(t10, "fp16", True)
    assert not tc.use_strong_typing(t86_strongless, "fp16", True) and tc.use_strong_typing(t11, "int8", False)
    cfg = type("C", (), {"flags": [], "set_flag": lambda self, f: self.flags.append(f)})()
    tc.set_precision_flags(t10, cfg, "int8", strongly_typed=False)
    tc.set_precision_flags(t10, cfg, "fp16", strongly_typed=True)
    assert cfg.flags == ["FP16", "INT8"]
    assert tc.unsupported_reason(fake_trt("7.2.3", strong=False)) and tc.unsupported_reason(t8) is None


def test_trt_compat_execute_sets_shapes_and_addresses_then_runs():
    from dsk_compress.runtimes import trt_compat as tc

    log = []

    class Ctx:
        def set_input_shape(self, n, s):
            log.append(("shape", n, s))
            return s[0] <= 8

        def set_tensor_address(self, n, p):
            log.append(("addr", n, p))

        def execute_async_v3(self, stream):
            log.append(("run", stream))
            return True

    tc.execute(Ctx(), {"input_ids": 10, "logits": 20}, {"input_ids": (2, 32)}, 7)
    assert log == [("shape", "input_ids", (2, 32)), ("addr", "input_ids", 10), ("addr", "logits", 20), ("run", 7)]
    with pytest.raises(RuntimeError, match="outside the engine's optimization profile"):
        tc.execute(Ctx(), {"input_ids": 10}, {"input_ids": (64, 32)}, 7)
