"""The default run's teacher and final student on a GPU server: torch CUDA eager and torch.compile, bf16, batch 1 and 64.

    .venv/bin/python benchmarks/gpu_server.py [RUN_DIR] [--runs 30] [--out benchmarks/results/gpu_server-<gpu>.json]

RUN_DIR is a finished run of the default recipe (default: the newest ``runs/quant-prune-distill-*``). Measured with the
project's benchmark method (:mod:`dsk_compress.runtimes.measure`, each model and mode in a fresh worker process):
session creation, first inference (``torch.compile`` compiles there), warm-up, timed runs at batch 1 and batch 64
(throughput), peak host RSS and GPU memory; inputs stay on the GPU and each run ends with a synchronisation. Also the
accuracy of each model in bf16 on the task's validation windows. Models: the teacher (the recipe's, MoE routing as
trained) and the final student in torch, i.e. the float weights the QAT student was trained from (the pruned student;
fake-quant int8 has no meaning in bf16), plus the shipped int8 ONNX with onnxruntime's CUDA provider when the install
has it. The JSON names the GPU, driver-visible CUDA and versions. Without a CUDA GPU it refuses in one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

BATCHES = (1, 64)


def _latest_run() -> Path | None:
    runs = sorted(Path("runs").glob("quant-prune-distill-*/report.json"))
    return runs[-1].parent if runs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/gpu_server-<gpu>.json")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(
            "error: benchmarks/gpu_server.py measures torch on a CUDA GPU, and torch.cuda.is_available() is False here "
            "(hint: run it on a GPU server with a CUDA build of torch)",
            file=sys.stderr,
        )
        return 2
    run_dir = args.run_dir or _latest_run()
    if run_dir is None or not (run_dir / "manifest.json").is_file():
        print(
            "error: no finished run of the default recipe (hint: pass RUN_DIR, or run dsk-compress recipe quant-prune-distill)",
            file=sys.stderr,
        )
        return 2

    from dsk_compress.io import atomic_write_json
    from dsk_compress.models.source import load_model_source
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.runtimes import BenchConfig
    from dsk_compress.runtimes.measure import machine_facts
    from dsk_compress.runtimes.torch import benchmark_torch, load_hf_model, torch_forward
    from dsk_compress.tasks import build_task

    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = RecipeSpec.model_validate(manifest["recipe"])
    task = build_task(spec.task.model_dump())
    qat_from = next((st["outputs"].get("model") for st in manifest["stages"] if st["stage"] == "prune"), None) or next(
        st["outputs"]["model"] for st in manifest["stages"] if st["stage"] == "distill"
    )
    gpu = torch.cuda.get_device_name(0)
    cfg = BenchConfig(warmup=args.warmup, runs=args.runs, batch_size=BATCHES[0], throughput_batches=BATCHES[1:], seq_len=task.seq_len)
    out = {
        "version": 1,
        "device": {"gpu": gpu, "cuda": torch.version.cuda, "torch": torch.__version__, **machine_facts()},
        "run": run_dir.name,
        "dtype": args.dtype,
        "batches": list(BATCHES),
        "seq_len": task.seq_len,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        teacher_dir = Path(tmp) / "teacher"
        load_model_source(spec.teacher.model_dump(exclude_none=True)).save_pretrained(teacher_dir, safe_serialization=True)
        for name, mdir in (("teacher", teacher_dir), ("final-student-float", run_dir / qat_from)):
            entry = out["models"][name] = {"model_dir": str(mdir)}
            model = load_hf_model(mdir, dtype=args.dtype, device="cuda")
            entry["accuracy"] = task.evaluate(torch_forward(model)).as_dict()
            del model
            torch.cuda.empty_cache()
            for mode in ("eager", "compile"):
                r = benchmark_torch(mdir, task.example_inputs(1), cfg, dtype=args.dtype, device="cuda", compile=mode == "compile")
                entry[mode] = r.model_dump(mode="json")
                print(
                    f"{name} {mode}: "
                    + ", ".join(f"batch {b.batch_size} p50 {b.p50:.3f} ms, {b.tokens_per_s:,.0f} tokens/s" for b in r.timing.batches),
                    flush=True,
                )
    out["models"]["final-int8-onnx"] = _onnx_cuda(run_dir, manifest, task, cfg)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    path = args.out or Path("benchmarks/results") / f"gpu_server-{slug}.json"
    atomic_write_json(path, out)
    print(f"wrote {path}")
    return 0


def _onnx_cuda(run_dir: Path, manifest: dict, task, cfg) -> dict:
    """The shipped int8 ONNX with onnxruntime's CUDA execution provider, or why it was not measured."""
    import onnxruntime

    from dsk_compress.runtimes.onnxruntime import benchmark_onnx

    arts = next(st["outputs"]["artifacts"] for st in manifest["stages"] if st["stage"] == "export")
    final = arts.get("final") or {}
    path = final.get("qdq_path") or final.get("path")
    if path is None:
        return {"skipped": "the run has no int8 artifact"}
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return {"skipped": f"onnxruntime {onnxruntime.__version__} here has no CUDAExecutionProvider (install onnxruntime-gpu)"}
    r = benchmark_onnx(run_dir / path, task.example_inputs(1), cfg, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return {"artifact": path, **r.model_dump(mode="json")}


if __name__ == "__main__":
    sys.exit(main())
