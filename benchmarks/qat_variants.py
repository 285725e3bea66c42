"""One qat stage setting varied on the same student at equal steps: the accuracy each value gives, as shipped.

    .venv/bin/python benchmarks/qat_variants.py RUN_DIR --field activations --values asymmetric,symmetric \\
        --out benchmarks/results/qat_activations.json
    .venv/bin/python benchmarks/qat_variants.py RUN_DIR --field share_input_quantizers --values true,false \\
        --out benchmarks/results/qat_tying.json

RUN_DIR is a run of the default recipe with a prune stage. For each value the script runs a recipe of one qat stage
(RUN_DIR's qat settings with ``--field`` set to the value and ``steps`` to ``--steps``; its teacher, task and seed)
on RUN_DIR's pruned student, so every value sees the same data in the same order. Each QAT model is scored on the
validation windows in torch (fake quant, the stage's own metrics), as the export stage's int8 graph in ONNX Runtime
(Q/DQ, offline-optimized: what the report scores) and as the fused int8 decoder graph (what decodes), whose node
counts the JSON also records, with each value's accuracy minus the first value's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SCORES = ("torch_fake_quant", "onnxruntime_int8", "fused_int8")


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


def parse_value(text: str):
    """A ``--values`` item as the recipe's YAML would read it: JSON where it parses (``true``, ``0.5``), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--field", required=True, help="a qat stage field, e.g. activations or share_input_quantizers")
    ap.add_argument("--values", required=True, help="comma-separated values of --field; the first is the reference")
    ap.add_argument("--steps", type=int, default=100, help="QAT steps per value (the default recipe's count)")
    ap.add_argument("--out", type=Path, required=True)
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
    values = {v: parse_value(v) for v in args.values.split(",")}
    results = {}
    with tempfile.TemporaryDirectory(prefix="qat-variants-") as tmp:
        for label, value in values.items():
            qat = {**stages["qat"], "steps": args.steps, args.field: value}
            spec = RecipeSpec.model_validate({**recipe, "name": f"qat-{args.field}-{label}".replace("_", "-"), "student": {"hf": str(student)},
                                              "stages": [qat]})
            t0 = time.perf_counter()
            rd = run_recipe(spec, run_dir=Path(tmp) / label)
            m = read_json(rd / "qat" / "metrics.json")
            results[label] = {"torch_fake_quant": {k: m[k] for k in ("accuracy", "bits_per_byte")}, "float": m["float"],
                              "after_calibration": m["after_calibration"], "final_loss": m["train"].get("final_loss"),
                              **score(rd, task, stages["export"]), "seconds": round(time.perf_counter() - t0, 1)}
            print(label, json.dumps({k: results[label][k] for k in SCORES}), flush=True)
    first = next(iter(results))
    delta = {label: {k: round(r[k]["accuracy"] - results[first][k]["accuracy"], 4) for k in SCORES} for label, r in results.items() if label != first}
    out = {"version": 2, "run": args.run_dir.name, "student": str(student.relative_to(args.run_dir.resolve())), "field": args.field,
           "qat_steps": args.steps, "qat": {k: v for k, v in stages["qat"].items() if k not in (args.field, "steps")}, "results": results,
           f"accuracy_points_minus_{first}": delta}
    atomic_write_json(args.out, out)
    print(json.dumps({f"accuracy_points_minus_{first}": delta}))


if __name__ == "__main__":
    main()
