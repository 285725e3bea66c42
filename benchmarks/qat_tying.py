"""One activation quantizer per input tensor (q/k/v, gate/up share one) vs one per Linear: QAT accuracy at equal steps.

    .venv/bin/python benchmarks/qat_tying.py RUN_DIR [--steps 100] [--out benchmarks/results/qat_tying.json]

RUN_DIR is a run of the default recipe with a prune stage. For each mode the script runs a recipe of one qat stage
(RUN_DIR's qat settings except ``share_input_quantizers`` and ``steps``; its teacher, task and seed) on RUN_DIR's
pruned student, so both modes see the same data in the same order. Each QAT model is scored on the validation
windows in torch (fake quant, the stage's own metrics), as the export stage's int8 graph in ONNX Runtime (Q/DQ,
offline-optimized: what the report scores) and as the fused int8 decoder graph (what decodes), whose node counts
the JSON also records.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MODES = {"shared": True, "separate": False}


def score(rd: Path, task, export_cfg: dict) -> dict:
    """The QAT model of the run ``rd`` exported as the export stage does and as a fused graph, each scored on ``task``."""
    from dsk_compress.compress.qat import freeze_for_export, load_qat_model, shared_input_groups
    from dsk_compress.export.fused import export_fused
    from dsk_compress.export.int8 import export_int8_lm
    from dsk_compress.export.onnx import op_histogram, ort_predict
    from dsk_compress.runtimes.decode import fused_predict

    q = load_qat_model(rd / "qat" / "model")
    freeze_for_export(q)
    ex = export_int8_lm(q, task.example_inputs(2), rd / "int8.qdq.onnx", rd / "int8.onnx", export_cfg["opset"],
                        export_cfg["optimization"], min_sqnr_db=export_cfg["qdq_min_sqnr_db"])
    fused = export_fused(q, rd / "int8.fused.onnx", "int8")
    hist = op_histogram(fused)
    return {"shared_groups": len(shared_input_groups(q)),
            "onnxruntime_int8": task.evaluate(ort_predict(rd / "int8.onnx")).as_dict(),
            "fused_int8": task.evaluate(fused_predict(fused)).as_dict(),
            "integer_matmuls": ex["integer_matmuls"], "sqnr_db_vs_fake_quant": ex["sqnr_db_vs_fake_quant"],
            "fused_nodes": sum(hist.values()), "fused_ops": hist}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=100, help="QAT steps per mode (the default recipe's count)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/qat_tying.json"))
    args = ap.parse_args()

    from dsk_compress import run_recipe
    from dsk_compress.io import atomic_write_json, read_json
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.tasks import build_task

    manifest = read_json(args.run_dir / "manifest.json")
    recipe = manifest["recipe"]
    stages = {st["stage"]: st for st in recipe["stages"]}
    student = args.run_dir.resolve() / next(st["outputs"]["model"] for st in manifest["stages"] if st["stage"] == "prune")
    task = build_task(dict(recipe["task"]))
    results = {}
    with tempfile.TemporaryDirectory(prefix="qat-tying-") as tmp:
        for mode, share in MODES.items():
            qat = {**stages["qat"], "steps": args.steps, "share_input_quantizers": share}
            spec = RecipeSpec.model_validate({**recipe, "name": f"qat-tying-{mode}", "student": {"hf": str(student)}, "stages": [qat]})
            t0 = time.perf_counter()
            rd = run_recipe(spec, run_dir=Path(tmp) / mode)
            m = read_json(rd / "qat" / "metrics.json")
            results[mode] = {"torch_fake_quant": {k: m[k] for k in ("accuracy", "bits_per_byte")}, "float": m["float"],
                             "after_calibration": m["after_calibration"], "final_loss": m["train"].get("final_loss"),
                             **score(rd, task, stages["export"]), "seconds": round(time.perf_counter() - t0, 1)}
            print(mode, json.dumps({k: results[mode][k] for k in ("torch_fake_quant", "onnxruntime_int8", "fused_int8")}), flush=True)
    delta = {k: round(results["shared"][k]["accuracy"] - results["separate"][k]["accuracy"], 4)
             for k in ("torch_fake_quant", "onnxruntime_int8", "fused_int8")}
    out = {"version": 1, "run": args.run_dir.name, "student": str(student.relative_to(args.run_dir.resolve())), "qat_steps": args.steps,
           "qat": {k: v for k, v in stages["qat"].items() if k not in ("share_input_quantizers", "steps")}, "results": results,
           "shared_minus_separate_accuracy_points": delta}
    atomic_write_json(args.out, out)
    print(json.dumps({"shared_minus_separate_accuracy_points": delta}))


if __name__ == "__main__":
    main()
