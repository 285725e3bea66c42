"""Which student shape ships best at the demo's budget: depth-first against width-first cuts of the teacher, at equal
final size.

Each candidate is the default recipe (``quant-prune-distill``: the same 1.1M distillation tokens, prune fine-tune and
INT8 QAT) with another ``student.from_teacher`` cut and an FFN ratio that brings the pruned student to the default's
parameter count (within 2%). Every candidate runs in its own run directory through the CLI (resumable: an interrupted
candidate continues where it stopped), and its figures come from the run's report: the accuracy of the exported
artifacts in ONNX Runtime on the task's validation windows, their p50 (median of interleaved rounds) and sizes. To keep
a candidate to about 6 minutes on 2 cores, the int4 QAT student and the teacher's ONNX export are left out
(``stages.2.precisions=[int8]``, ``stages.3.precisions=[fp32, int8]``, ``stages.3.teacher=skip``); they do not depend
on the shape.

    .venv/bin/python benchmarks/student_shape.py [--only width-6x168] [--out benchmarks/results/student_shape.json]

Minitron (Muralidharan et al., 2024) found width pruning with distillation better than depth pruning at equal size for
dense LLMs; this measures whether that holds for a student cut from an MoE teacher at a small token budget.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

# name -> (teacher layers kept, FFN width cut from the experts, prune ffn_ratio, ffn_init, what it tests)
CANDIDATES = {
    "depth-4x768-prune-0.5": ([0, 2, 4, 5], 768, 0.5, "merge", "the default: 4 of 6 layers, then FFN 768 -> 384"),
    "width-6x336-prune-0.5": ([0, 1, 2, 3, 4, 5], 336, 0.5, "merge", "every layer, narrower merged FFN: 336 -> 168"),
    "width-6x768-prune-0.78": ([0, 1, 2, 3, 4, 5], 768, 0.78, "merge", "every layer, the default's width, pruned harder: 768 -> 168"),
    "mid-5x512-prune-0.5": ([0, 1, 2, 4, 5], 512, 0.5, "merge", "5 of 6 layers: 512 -> 256"),
    "depth-3x1184-prune-0.5": ([0, 2, 5], 1184, 0.5, "merge", "3 of 6 layers, wider: 1184 -> 592"),
    "depth-4x768-top": ([0, 2, 4, 5], 768, 0.5, "top", "the default's shape with the top expert's FFN instead of the merge"),
}
OFF = ["stages.2.precisions=[int8]", "stages.3.precisions=[fp32, int8]", "stages.3.teacher=skip"]


def overrides(layers, width, ratio, init) -> list[str]:
    return [
        f"student.from_teacher.layers={json.dumps(layers)}",
        f"student.from_teacher.intermediate_size={width}",
        f"student.from_teacher.ffn_init={init}",
        f"stages.1.ffn_ratio={ratio}",
        *OFF,
    ]


def run(run_dir: Path, sets: list[str]) -> float:
    """Run (or resume) the default recipe with ``sets`` in ``run_dir``; the wall seconds of this call."""
    cmd = [sys.executable, "-m", "dsk_compress.cli.main", "recipe", "quant-prune-distill", "--run-dir", str(run_dir)]
    if (run_dir / "manifest.json").is_file():
        cmd.append("--resume")
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def collect(run_dir: Path) -> dict:
    """The candidate's figures from its finished run: ONNX Runtime accuracy, p50 and size of each student variant."""
    from dsk_compress.report import load_report

    rows = {v["name"]: v for v in load_report(run_dir)["variants"]}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out = {"stage_seconds": {s["stage"]: s.get("seconds") for s in manifest["stages"]}}
    for name in ("student-distill", "student-prune", "final"):
        v = rows[name]
        lat = v.get("latency_ms") or {}
        out[name] = {
            "params": v["params"],
            "size_bytes": v.get("size_bytes"),
            "accuracy": round(v["accuracy"], 3),
            "bits_per_byte": v.get("bits_per_byte"),
            "p50_ms": lat.get("p50"),
            "p50_rounds": lat.get("p50_rounds"),
            "decode_tokens_per_s": v.get("decode_tokens_per_s"),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/student-shape", help="parent of the candidates' run directories")
    ap.add_argument("--out", default="benchmarks/results/student_shape.json")
    ap.add_argument("--only", action="append", choices=sorted(CANDIDATES), help="run only these candidates (repeatable)")
    args = ap.parse_args()
    work, out_path = Path(args.work), Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update(
        version=1,
        machine=f"{platform.machine()}, {platform.processor() or 'cpu'}",
        recipe="quant-prune-distill",
        common_overrides=OFF,
        candidates=result.get("candidates", {}),
    )
    for name in args.only or CANDIDATES:
        layers, width, ratio, init, what = CANDIDATES[name]
        sets = overrides(layers, width, ratio, init)
        run_dir = work / name
        finished = (run_dir / "report.json").is_file()
        wall = None if finished else run(run_dir, sets)
        entry = {"what": what, "overrides": sets, **collect(run_dir)}
        if wall is not None:
            entry["wall_s"] = round(wall, 1)
        elif name in result["candidates"] and "wall_s" in result["candidates"][name]:
            entry["wall_s"] = result["candidates"][name]["wall_s"]
        result["candidates"][name] = entry
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        f = entry["final"]
        print(f"{name}: final {f['accuracy']}% at {f['params']:,} params, p50 {f['p50_ms']} ms", flush=True)
    done = result["candidates"]
    if done:
        ref = done.get("depth-4x768-prune-0.5")
        ranked = sorted(done, key=lambda n: -done[n]["final"]["accuracy"])
        result["ranking_by_final_accuracy"] = ranked
        if ref:
            result["final_accuracy_vs_default"] = {n: round(done[n]["final"]["accuracy"] - ref["final"]["accuracy"], 3) for n in ranked}
            result["final_params_vs_default"] = {n: round(done[n]["final"]["params"] / ref["final"]["params"], 3) for n in ranked}
        out_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
