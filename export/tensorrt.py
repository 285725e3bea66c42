"""TensorRT at export time: the static ONNX check, then the engine build where tensorrt and a GPU exist.

The check (:mod:`dsk_compress.export.trt_check`) runs everywhere and refuses a graph TensorRT would not
build. The engine is built only where ``tensorrt`` imports and a GPU is present; it then runs once on the
example inputs and is compared with the torch reference. Elsewhere the info says why no engine was built
(the bundle's ``run.py`` builds it on the device). ``tensorrt`` itself is imported only inside
:mod:`dsk_compress.runtimes.tensorrt`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dsk_compress.errors import ExportError


def export_tensorrt(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    name: str,
    device: str,
    precision: str,
    reference: np.ndarray,
    example: np.ndarray,
    seq_len: int,
    max_batch: int,
    opt_batch: int,
    workspace_gb: float,
    build: bool = True,
) -> dict:
    """Check ``onnx_path`` (the artifact ``name`` for ``device``) for TensorRT and build ``engine_path`` from it.

    The optimization profile covers batch 1..``max_batch`` (optimal ``opt_batch``) and sequence 1..``seq_len``
    of ``input_ids``; ``build`` False skips the build. ``reference``: the torch logits on ``example``, against
    which a built engine is measured. Returns ``{"device", "onnx", "precision", "problems", "engine", "profile",
    "workspace_gb", ...}`` with either the build's numbers or a ``note`` on why there is no engine; raises
    ExportError when the graph is not TensorRT-compatible.
    """
    from dsk_compress.compress.qat import sqnr_db
    from dsk_compress.export.trt_check import check_tensorrt_onnx, format_problems
    from dsk_compress.runtimes.tensorrt import build_engine, lm_profiles, tensorrt_status

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    problems = check_tensorrt_onnx(onnx_path)
    if problems:
        raise ExportError(
            f"{name} for {device} (TensorRT) is not TensorRT-compatible: {format_problems(problems)}",
            hint="fix the export, or export for a device whose preferred runtime is onnxruntime",
        )
    profile = lm_profiles("input_ids", seq_len, max_batch, opt_batch)
    info = {
        "device": device,
        "onnx": onnx_path,
        "precision": precision,
        "problems": 0,
        "engine": None,
        "profile": {k: [list(x) for x in v] for k, v in profile.items()},
        "workspace_gb": workspace_gb,
    }
    ok, why = tensorrt_status()
    if not (ok and build):
        why = why if not ok else "tensorrt.build_engine is off"
        info["note"] = (
            f"engine not built at export ({why}): it must be built on {device}; the bundle's run.py builds it "
            "there on first run with the same precision and profile and caches it next to the model"
        )
        return info
    from dsk_compress.runtimes.tensorrt import TensorRTSession

    t0 = time.perf_counter()
    build_engine(
        onnx_path,
        engine_path,
        precision=precision,
        workspace_gb=workspace_gb,
        timing_cache_path=onnx_path.parent / "tensorrt.timing.cache",
        profiles=profile,
    )
    got = np.asarray(TensorRTSession(engine_path)(example), np.float64)
    info.update(
        engine=engine_path,
        tensorrt_version=why,
        build_seconds=round(time.perf_counter() - t0, 1),
        engine_max_abs_diff=float(np.abs(got - reference).max()),
        engine_sqnr_db=round(sqnr_db(reference, got), 2),
        note="engine built on the export host: it runs only on that GPU model with that TensorRT version",
    )
    return info
