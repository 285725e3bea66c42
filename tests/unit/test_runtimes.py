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
    summarize,
)

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


def test_summarize_computes_percentiles_and_throughput():
    r = summarize([1.0, 2.0, 3.0, 4.0], batch_size=2, peak_memory_mb=1.0, runtime="x", device="cpu")
    assert r.p50 == pytest.approx(2.5)
    assert r.mean == pytest.approx(2.5)
    assert r.throughput == pytest.approx(2 * 1000 / 2.5)
    assert r.runs == 4
    d = r.as_dict()
    assert d["runtime"] == "x" and d["providers"] == [] and "std" in d


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
    assert r.runtime == "onnxruntime" and r.device == "cpu"
    assert r.providers == ["CPUExecutionProvider"]
    # the worker ran the model once it had loaded it: peak RSS is at least the pre-load RSS
    assert r.peak_memory_mb >= r.extra["rss_before_load_mb"]


def test_benchmark_onnx_fits_inputs_to_batch_size(linear):
    r = benchmark_onnx(linear[1], np.zeros((1, 8), np.float32), BenchConfig(warmup=0, runs=2, batch_size=3, threads=1))
    assert r.extra["output_shape"] == [3, 4]
    assert r.batch_size == 3


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
    rc = bench_worker.main(["--kind", "onnx", "--model", str(linear[1]), "--inputs", str(inputs), "--warmup", "1", "--runs", "3", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["times_ms"]) == 3 and data["peak_memory_mb"] > 0 and data["input_shape"] == [2, 8]


def test_import_runtimes_does_not_import_backends():
    code = "import sys, dsk_compress.runtimes, dsk_compress.devices; print(sorted(m for m in ('onnxruntime', 'tensorrt') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- eager torch


def test_benchmark_torch_runs_hf_model_dir(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m", safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 32, size=(1, 8), dtype=np.int64)
    r = benchmark_torch(tmp_path / "m", ids, BenchConfig(warmup=1, runs=3, threads=1))
    assert r.runtime == "torch-eager-cpu" and r.device == "cpu"
    assert r.runs == 3 and r.p50 <= r.p90 <= r.p99
    assert r.peak_memory_mb > 0
    assert r.extra["output_shape"] == [1, 8, 32]


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
    r = benchmark_tensorrt(engine, np.zeros((1, 8), np.float32), BenchConfig(warmup=2, runs=10))
    assert r.runtime == "tensorrt" and r.runs == 10 and r.p50 <= r.p90 <= r.p99
