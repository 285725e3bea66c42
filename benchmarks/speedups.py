"""Speed-ups measured in one run on this host: INT8 vs fp32 student, pruned vs unpruned, student vs teacher.

Re-benchmarks a finished run's ONNX artifacts with ONNX Runtime CPU at batch 1 (each model in its
own worker process, several interleaved rounds) and writes medians and ratios to JSON.

    python benchmarks/speedups.py runs/quant-prune-distill-<time> --out benchmarks/results/speedups.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dsk_compress.io import atomic_write_json
from dsk_compress.report import load_report
from dsk_compress.runtimes import BenchConfig
from dsk_compress.runtimes.onnxruntime import benchmark_onnx
from dsk_compress.tasks import build_task

PAIRS = {
    "int8_vs_fp32_student": ("student-prune", "final"),
    "pruned_vs_unpruned_fp32": ("student-distill", "student-prune"),
    "final_vs_teacher": ("teacher", "final"),
    "qat_int8_vs_ptq_dynamic": ("ptq-dynamic", "final"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", default="benchmarks/results/speedups.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    report = load_report(args.run_dir)
    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    task = build_task({k: v for k, v in manifest["recipe"]["task"].items()})
    x = task.example_inputs(1)
    arts = {
        v["name"]: args.run_dir / v["artifact"] for v in report["variants"] if v.get("artifact") and v["runtime"].startswith("onnxruntime")
    }
    p50: dict[str, list[float]] = {n: [] for n in arts}
    for _ in range(args.rounds):  # interleave so drift in machine load hits every model alike
        for name, path in arts.items():
            r = benchmark_onnx(path, x, BenchConfig(warmup=5, runs=args.runs, threads=args.threads))
            p50[name].append(r.p50)
    med = {n: statistics.median(v) for n, v in p50.items()}
    ratios = {k: round(med[a] / med[b], 3) for k, (a, b) in PAIRS.items() if a in med and b in med}
    out = {
        "version": 1,
        "run": str(args.run_dir),
        "batch_size": 1,
        "seq_len": task.seq_len,
        "threads": args.threads,
        "rounds": args.rounds,
        "runs_per_round": args.runs,
        "p50_ms_median": {k: round(v, 3) for k, v in med.items()},
        "p50_ms_rounds": p50,
        "speedup": ratios,
    }
    atomic_write_json(args.out, out)
    print(json.dumps({"p50_ms_median": out["p50_ms_median"], "speedup": ratios}, indent=2))


if __name__ == "__main__":
    main()
