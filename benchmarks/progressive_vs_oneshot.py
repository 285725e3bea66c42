"""Progressive vs one-shot pruning of the default recipe's distilled student, same fine-tune budget.

Prunes 50% of the FFN channels and 50% of the attention heads (whole KV groups) of a distilled
student in ``--iterations`` slices with ``--steps`` KD fine-tune steps after each, and one-shot to the
same structure with ``iterations x steps`` fine-tune steps (role ``pruned-oneshot``). Both are exported
and measured by the bench stage, so the accuracies below are ONNX Runtime's, read from the run's report.

    python benchmarks/progressive_vs_oneshot.py --student runs/quant-prune-distill-<stamp>/distill/model
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from dsk_compress import run_recipe
from dsk_compress.io import atomic_write_json
from dsk_compress.recipes import load_recipe
from dsk_compress.recipes.schema import RecipeSpec


def _latest_student() -> str | None:
    runs = sorted(Path("runs").glob("quant-prune-distill-*/distill/model/config.json"))
    return str(runs[-1].parent) if runs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default=None, help="a distilled student directory (default: the latest default-recipe run's)")
    ap.add_argument("--ffn-ratio", type=float, default=0.5)
    ap.add_argument("--head-ratio", type=float, default=0.5)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50, help="KD fine-tune steps after each progressive slice")
    ap.add_argument("--out-dir", default="runs")
    ap.add_argument("--out", default="benchmarks/results/progressive_vs_oneshot.json")
    args = ap.parse_args()
    student = args.student or _latest_student()
    if student is None:
        raise SystemExit("no distilled student: run `make demo` first or pass --student DIR")
    base = load_recipe("quant-prune-distill").model_dump()
    prune = {
        **next(s for s in base["stages"] if s["stage"] == "prune"),
        "ffn_ratio": args.ffn_ratio,
        "head_ratio": args.head_ratio,
        "iterations": args.iterations,
        "steps": args.steps,
        "baselines": ["oneshot"],
    }
    bench = next(s for s in base["stages"] if s["stage"] == "bench")
    spec = RecipeSpec.model_validate(
        {
            **base,
            "name": "progressive-vs-oneshot",
            "student": {"hf": str(Path(student).resolve())},
            "stages": [prune, {"stage": "export", "ptq_baselines": False}, bench],
        }
    )
    rd = run_recipe(spec, out=args.out_dir)
    report = json.loads((rd / "report.json").read_text())
    by_role = {v["role"]: v for v in report["variants"]}
    pm = json.loads((rd / "prune" / "metrics.json").read_text())
    prog, one = by_role["student"], by_role["pruned-oneshot"]
    out = {
        "version": 1,
        "host": f"{platform.node()} {platform.machine()}",
        "run": str(rd),
        "student": student,
        "ffn_ratio": args.ffn_ratio,
        "head_ratio": args.head_ratio,
        "iterations": args.iterations,
        "fine_tune_steps": {"progressive": args.steps * args.iterations, "oneshot": args.steps * args.iterations},
        "structure_after": pm["structure_after"]["layers"][0],
        "params_before": pm["params_before"],
        "params_after": pm["params_after"],
        "accuracy_before_torch": round(pm["accuracy_before"], 3),
        "progressive_accuracy_onnx": prog["accuracy"],
        "oneshot_accuracy_onnx": one["accuracy"],
        "progressive_minus_oneshot": round(prog["accuracy"] - one["accuracy"], 3),
        "progressive_after_each_slice": [
            {"accuracy_after_prune": it["accuracy_after_prune"], "after_fine_tune": round(it["accuracy"], 3)} for it in pm["iterations"]
        ],
        "oneshot_after_prune": pm["baseline_oneshot"]["iterations"][0]["accuracy_after_prune"],
        "latency_p50_ms": {"progressive": prog["latency_ms"]["p50"], "oneshot": one["latency_ms"]["p50"]},
    }
    atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
