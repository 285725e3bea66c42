"""Symmetric vs asymmetric int8 activations in QAT: the accuracy each gives the same student, as shipped in ONNX Runtime.

    .venv/bin/python benchmarks/qat_activations.py RUN_DIR [--steps 60] [--out benchmarks/results/qat_activations.json]

RUN_DIR is a run of the default recipe with a prune stage: its pruned student is the starting point of both QAT runs,
which use the recipe's qat settings except ``activations`` and ``steps``, the same seed and the same data. Each QAT
model is exported as the export stage does (Q/DQ, then ORT's offline optimization) and scored with the task on the
validation windows in ONNX Runtime (the shipped artifact), and in torch (fake quant). Symmetric int8 activations (zero
point 0) are what TensorRT needs; the default recipe uses them since they lose nothing measurable here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=60, help="QAT steps per mode (the recipe's own count by default is 100)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/qat_activations.json"))
    args = ap.parse_args()

    from dsk_compress.compress.qat import freeze_for_export, load_qat_model
    from dsk_compress.export.int8 import export_int8_lm
    from dsk_compress.export.onnx import ort_predict
    from dsk_compress.io import atomic_write_json
    from dsk_compress.recipes.base import RunContext
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.recipes.stages.qat import QATStage

    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    spec = RecipeSpec.model_validate(manifest["recipe"])
    qat_cfg = next(st for st in spec.stages if st.stage == "qat")
    export_cfg = next(st for st in spec.stages if st.stage == "export")
    prune_model = next(st["outputs"]["model"] for st in manifest["stages"] if st["stage"] == "prune")
    results = {}
    with tempfile.TemporaryDirectory(prefix="qat-acts-") as tmp:
        for mode in ("asymmetric", "symmetric"):
            rd = Path(tmp) / mode
            shutil.copytree(args.run_dir / prune_model, rd / prune_model)
            ctx = RunContext(rd, spec)
            ctx.outputs = {"prune": {"model": prune_model}}
            cfg = qat_cfg.model_copy(update={"activations": mode, "steps": args.steps})
            t0 = time.perf_counter()
            m = QATStage(cfg).run(ctx).metrics
            q = load_qat_model(rd / "qat" / "model")
            freeze_for_export(q)
            ex = export_int8_lm(q, ctx.task.example_inputs(2), rd / "int8.qdq.onnx", rd / "int8.onnx", export_cfg.opset,
                                export_cfg.optimization, min_sqnr_db=export_cfg.qdq_min_sqnr_db)
            ort = ctx.task.evaluate(ort_predict(rd / "int8.onnx")).as_dict()
            results[mode] = {"torch_fake_quant": {k: m[k] for k in ("accuracy", "bits_per_byte")}, "after_calibration": m["after_calibration"],
                             "float": m["float"], "onnxruntime_int8": ort, "integer_matmuls": ex.get("integer_matmuls"),
                             "sqnr_db_vs_fake_quant": ex.get("sqnr_db_vs_fake_quant"), "seconds": round(time.perf_counter() - t0, 1)}
            print(mode, json.dumps(results[mode]["onnxruntime_int8"]))
    delta = results["symmetric"]["onnxruntime_int8"]["accuracy"] - results["asymmetric"]["onnxruntime_int8"]["accuracy"]
    out = {"version": 1, "run": args.run_dir.name, "student": prune_model, "qat_steps": args.steps,
           "qat": qat_cfg.model_dump(exclude={"activations", "steps"}), "results": results,
           "symmetric_minus_asymmetric_accuracy_points": round(delta, 4)}
    atomic_write_json(args.out, out)
    print(json.dumps({"symmetric_minus_asymmetric_accuracy_points": out["symmetric_minus_asymmetric_accuracy_points"]}))


if __name__ == "__main__":
    main()
