"""Peak memory of a benchmark is the worker's own, not inherited from a large launching process."""

from __future__ import annotations

import numpy as np
import torch


def test_worker_peak_memory_is_not_the_parents(tmp_path):
    from dsk_compress.runtimes import BenchConfig
    from dsk_compress.runtimes.onnxruntime import benchmark_onnx

    lin = torch.nn.Linear(8, 8).eval()
    path = tmp_path / "lin.onnx"
    torch.onnx.export(lin, (torch.zeros(1, 8),), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    ballast = np.ones(100_000_000, dtype=np.float64)  # ~800 MB resident in this (launching) process
    ballast[::4096] = 2.0
    r = benchmark_onnx(path, np.zeros((1, 8), np.float32), BenchConfig(warmup=1, runs=3))
    assert ballast.sum() > 0
    assert 10 < r.peak_memory_mb < 400
