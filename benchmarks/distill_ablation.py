"""Does distillation pay? The 2x2 of (expert-merged | random FFN init) x (KD | no KD) at equal tokens.

Runs the bundled ``distill-ablation`` recipe (or resumes it: an interrupted run continues where it stopped),
then writes the accuracy of each student's exported fp32 ONNX model, scored by the bench stage in ONNX Runtime
on the task's validation windows, with the torch accuracy and the training time of each:

    .venv/bin/python benchmarks/distill_ablation.py [--out benchmarks/results/distill_ablation.json] [--set stages.0.steps=200]

``--set`` overrides recipe fields as ``dsk-compress recipe --set`` does (one run directory per setting: pass
``--run-dir``). The issue's bar: merge+KD at least 1.5 points above merge without KD, and
merge+KD > random+KD > random without KD.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

# (cell of the 2x2) -> (report variant, where its training metrics are in the run directory)
CELLS = {
    "merge-kd": ("student-distill", "distill/metrics.json"),
    "merge-nokd": ("student-nokd", "distill/baselines/nokd/metrics.json"),
    "random-kd": ("student-random-init", "distill/baselines/random-init/metrics.json"),
    "random-nokd": ("student-random-init-nokd", "distill/baselines/random-init-nokd/metrics.json"),
}


def run_recipe(run_dir: Path, overrides: list[str], threads: int | None) -> None:
    """Run (or resume) the recipe in ``run_dir`` through the CLI, progress bars on this terminal."""
    cmd = [sys.executable, "-m", "dsk_compress.cli.main", "recipe", "distill-ablation", "--run-dir", str(run_dir)]
    if (run_dir / "manifest.json").is_file():
        cmd.append("--resume")
    for o in overrides:
        cmd += ["--set", o]
    if threads:
        cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True)


def collect(run_dir: Path) -> dict:
    """The 2x2 from a finished run: ONNX Runtime accuracy per cell, torch accuracy and training time, margins."""
    from dsk_compress.report import load_report

    report = load_report(run_dir)
    rows = {v["name"]: v for v in report["variants"]}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out: dict = {"accuracy": {}, "bits_per_byte": {}, "torch_accuracy": {}, "training": {}}
    tokens = set()
    for cell, (variant, metrics_path) in CELLS.items():
        row = rows.get(variant)
        if row is None or row.get("accuracy") is None:
            raise SystemExit(f"{run_dir}: the report has no measured {variant!r}: is the run finished? (resume it: rerun this script)")
        m = json.loads((run_dir / metrics_path).read_text())
        out["accuracy"][cell] = round(row["accuracy"], 3)
        out["bits_per_byte"][cell] = row.get("bits_per_byte")
        out["torch_accuracy"][cell] = round(m["accuracy"], 3)
        t = m["train"]
        out["training"][cell] = {k: t.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_s")} | {
            "init_accuracy": round(m["init"]["accuracy"], 3)
        }
        tokens.add(t["tokens"])
    if len(tokens) != 1:
        raise SystemExit(f"the four students saw different token counts {sorted(tokens)}: not an ablation at equal tokens")
    a = out["accuracy"]
    teacher = rows.get("teacher", {})
    out.update(
        {
            "tokens": tokens.pop(),
            "teacher_accuracy": teacher.get("accuracy"),
            "margins": {
                "kd_gain_merge_init": round(a["merge-kd"] - a["merge-nokd"], 3),
                "kd_gain_random_init": round(a["random-kd"] - a["random-nokd"], 3),
                "merge_init_gain_with_kd": round(a["merge-kd"] - a["random-kd"], 3),
            },
            "bar": {
                "merge-kd >= merge-nokd + 1.5": a["merge-kd"] >= a["merge-nokd"] + 1.5,
                "merge-kd > random-kd > random-nokd": a["merge-kd"] > a["random-kd"] > a["random-nokd"],
            },
            "recipe": manifest.get("recipe", {}).get("name", "distill-ablation"),
            "distill": next((s for s in manifest.get("recipe", {}).get("stages", []) if s.get("stage") == "distill"), None),
            "run_dir": str(run_dir),
        }
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_ablation.json"))
    ap.add_argument("--run-dir", type=Path, default=Path("runs/distill-ablation"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, as dsk-compress recipe --set")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's, else physical cores)")
    ap.add_argument("--collect-only", action="store_true", help="only read a finished run in --run-dir")
    args = ap.parse_args()

    t0 = time.time()
    if not args.collect_only:
        run_recipe(args.run_dir, args.overrides, args.threads)
    out = {
        "version": 1,
        **collect(args.run_dir),
        "measured": {
            "host": f"{platform.node()} {platform.machine()}",
            "date": time.strftime("%Y-%m-%d"),
            "wall_seconds_this_process": round(time.time() - t0, 1),
            "note": "accuracy: each student's exported fp32 ONNX model in ONNX Runtime on the task's validation windows",
        },
    }
    from dsk_compress.io import atomic_write_json

    atomic_write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("accuracy", "tokens", "margins", "bar")}, indent=2))


if __name__ == "__main__":
    main()
