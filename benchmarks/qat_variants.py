"""One qat stage setting varied on the same student at equal steps: the accuracy each value gives, as shipped.

    .venv/bin/python benchmarks/qat_variants.py RUN_DIR --field activations --values asymmetric,symmetric \\
        --out benchmarks/results/qat_activations.json
    .venv/bin/python benchmarks/qat_variants.py RUN_DIR --field share_input_quantizers --values true,false \\
        --out benchmarks/results/qat_tying.json
    .venv/bin/python benchmarks/qat_variants.py RUN_DIR --precisions int8,int4 --out benchmarks/results/qat_int4.json
    .venv/bin/python benchmarks/qat_variants.py RUN_DIR --precisions int4 --field int4.head_bits --values 8,4,null \\
        --out benchmarks/results/qat_int4_head.json

RUN_DIR is a run of the default recipe with a prune stage. For each value the script runs a recipe of one qat stage
(RUN_DIR's qat settings with ``--field`` set to the value, a dotted name reaching into ``int4``; ``steps`` set to
``--steps``; ``precisions`` to ``--precisions`` and each ``--set FIELD=VALUE`` when given; RUN_DIR's teacher, task and
seed) on RUN_DIR's pruned
student, so every value and precision sees the same data in the same order. Without ``--field`` it runs once. RUN_DIR's
teacher-logit cache, when it has one, is hard-linked into each run (the same batches, not computed again).

Each QAT student is scored on the validation windows in torch (fake quant, the stage's own metrics), as the export
stage ships it in ONNX Runtime and as its fused decoder graph (what decodes): int8 as the Q/DQ graph, offline-optimized
(``onnxruntime_int8``, ``fused_int8``, with the fused graph's node counts); int4 as its MatMulNBits graphs packed with the
trained scales (``onnxruntime_int4``, ``fused_int4``, with the exported graphs' SQNR against the fake quant). With an int4
precision the JSON also holds the baselines of the same student: its fp32 graph and ONNX Runtime's post-training int4
(``MatMulNBitsQuantizer``, RTN, block 32, accuracy_level 4: the export stage's ``student-int4``), the teacher's graph
size from RUN_DIR's export, and the issue's targets checked (int4 QAT >= INT8 QAT - 0.5 points and >= int4 PTQ + 1.0
in ONNX Runtime; teacher / int4 QAT size >= 40). Each value's accuracy minus the first value's closes the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

SCORES = {"int8": ("torch_fake_quant", "onnxruntime_int8", "fused_int8"), "int4": ("torch_fake_quant", "onnxruntime_int4", "fused_int4")}
TARGETS = {"int4_minus_int8_min": -0.5, "int4_minus_int4_ptq_min": 1.0, "teacher_over_int4_size_min": 40.0}


def score_int8(model_dir: Path, work: Path, task, export_cfg: dict) -> dict:
    """The int8 QAT model at ``model_dir`` exported as the export stage does and as a fused graph, each scored on ``task``."""
    from dsk_compress.compress.qat import freeze_for_export, load_qat_model, shared_input_groups
    from dsk_compress.export import graph_files
    from dsk_compress.export.fused import export_fused
    from dsk_compress.export.int8 import export_int8_lm
    from dsk_compress.export.onnx import op_histogram, ort_predict
    from dsk_compress.runtimes.decode import fused_predict

    q = load_qat_model(model_dir)
    freeze_for_export(q)
    ex = export_int8_lm(
        q,
        task.example_inputs(2),
        work / "int8.qdq.onnx",
        work / "int8.onnx",
        export_cfg["opset"],
        export_cfg["optimization"],
        min_sqnr_db=export_cfg["qdq_min_sqnr_db"],
    )
    fused = export_fused(q, work / "int8.fused.onnx", "int8")
    hist = op_histogram(fused)
    return {
        "shared_groups": len(shared_input_groups(q)),
        "onnxruntime_int8": task.evaluate(ort_predict(work / "int8.onnx")).as_dict(),
        "fused_int8": task.evaluate(fused_predict(fused)).as_dict(),
        "integer_matmuls": ex["integer_matmuls"],
        "sqnr_db_vs_fake_quant": ex["sqnr_db_vs_fake_quant"],
        "size_bytes": graph_files.size(work / "int8.onnx"),
        "fused_nodes": sum(hist.values()),
        "fused_ops": hist,
    }


def score_int4(model_dir: Path, work: Path, task, export_cfg: dict) -> dict:
    """The int4 QAT model at ``model_dir`` as the export stage writes it (full-sequence, KV-cache and fused MatMulNBits graphs
    with its trained scales, each checked against the fake quant), the full and fused graphs scored on ``task``."""
    from dsk_compress.compress.qat import load_qat_model
    from dsk_compress.export import graph_files
    from dsk_compress.export.fused import export_fused_checked
    from dsk_compress.export.int4 import export_int4_kv, export_int4_lm
    from dsk_compress.export.onnx import op_histogram, ort_predict
    from dsk_compress.runtimes.decode import fused_predict

    q = load_qat_model(model_dir)
    example = task.example_inputs(2)
    floor = export_cfg["qdq_min_sqnr_db"]
    full = export_int4_lm(q, example, work / "int4.onnx", export_cfg["opset"], export_cfg["optimization"], min_sqnr_db=floor)
    kv = export_int4_kv(q, work / "int4.kv.onnx", example, export_cfg["opset"], export_cfg["optimization"], min_sqnr_db=floor)
    fused = export_fused_checked(q, work / "int4.fused.onnx", "int4", example, parity_atol=export_cfg["parity_atol"], min_sqnr_db=floor)
    hist = op_histogram(fused["path"])
    parity = ("tokens_match", "step_logits_sqnr_db", "step_logits_max_abs_diff")
    return {
        "onnxruntime_int4": task.evaluate(ort_predict(full["path"])).as_dict(),
        "fused_int4": task.evaluate(fused_predict(fused["path"])).as_dict(),
        "sqnr_db_vs_fake_quant": full["sqnr_db_vs_fake_quant"],
        "kv_parity": {k: kv.get(k) for k in parity},
        "fused_parity": {k: fused[k] for k in parity},
        "matmul_nbits": full["matmul_nbits"],
        "int8_embeddings": full["int8_embeddings"],
        "size_bytes": graph_files.size(full["path"]),
        "fused_size_bytes": graph_files.size(fused["path"]),
        "fused_nodes": sum(hist.values()),
        "fused_ops": hist,
    }


def baselines(student: Path, work: Path, task, export_cfg: dict) -> dict:
    """The float student's fp32 graph and ONNX Runtime's post-training int4 of it (what the export stage's ``student-int4`` is), scored."""
    from dsk_compress.export import graph_files
    from dsk_compress.export.fused import quantize_int4
    from dsk_compress.export.onnx import export_float, ort_predict
    from dsk_compress.models.source import load_hf_dir

    m = load_hf_dir(student)
    fp32 = export_float(
        m,
        task.example_inputs(2),
        work / "fp32.onnx",
        export_cfg["opset"],
        export_cfg["optimization"],
        export_cfg["parity_atol"],
        keep_raw=True,
    )
    ptq = quantize_int4(work / "fp32.raw.onnx", work / "int4-ptq.onnx")
    return {
        "student_fp32": {**task.evaluate(ort_predict(fp32["path"])).as_dict(), "size_bytes": graph_files.size(fp32["path"])},
        "int4_ptq_onnxruntime": {
            **task.evaluate(ort_predict(ptq)).as_dict(),
            "size_bytes": graph_files.size(ptq),
            "how": "onnxruntime MatMulNBitsQuantizer RTN, block 32, symmetric, accuracy_level 4, every MatMul (LM head too)",
        },
    }


def teacher_size(run_dir: Path, manifest: dict) -> int | None:
    """The teacher's exported graph size in RUN_DIR (None when the run has no finished export)."""
    from dsk_compress.export import graph_files

    export = next((st for st in manifest["stages"] if st["stage"] == "export" and st.get("status") == "done"), None)
    path = ((export or {}).get("outputs", {}).get("artifacts", {}).get("teacher") or {}).get("path")
    return graph_files.size(run_dir / path) if path and (run_dir / path).is_file() else None


def parse_value(text: str):
    """A ``--values`` item as the recipe's YAML would read it: JSON where it parses (``true``, ``0.5``, ``null``), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_field(qat: dict, field: str, value) -> dict:
    """``qat`` with the (dotted) ``field`` set to ``value``: ``int4.head_bits`` reaches into the nested ``int4`` settings."""
    out = json.loads(json.dumps(qat))
    *parents, leaf = field.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def targets(result: dict, base: dict, teacher_bytes: int | None) -> dict:
    """The issue's int4 targets on one value's result (ONNX Runtime accuracies, full-sequence graph sizes)."""
    int4 = result["int4"]["onnxruntime_int4"]["accuracy"]
    out = {
        "int4_qat_accuracy": round(int4, 4),
        "int4_ptq_accuracy": round(base["int4_ptq_onnxruntime"]["accuracy"], 4),
        "int4_minus_int4_ptq": round(int4 - base["int4_ptq_onnxruntime"]["accuracy"], 4),
    }
    out["int4_minus_int4_ptq_ok"] = out["int4_minus_int4_ptq"] >= TARGETS["int4_minus_int4_ptq_min"]
    if "int8" in result:
        int8 = result["int8"]["onnxruntime_int8"]["accuracy"]
        out.update(int8_qat_accuracy=round(int8, 4), int4_minus_int8=round(int4 - int8, 4))
        out["int4_minus_int8_ok"] = out["int4_minus_int8"] >= TARGETS["int4_minus_int8_min"]
    if teacher_bytes:
        out.update(
            teacher_size_bytes=teacher_bytes,
            int4_size_bytes=result["int4"]["size_bytes"],
            teacher_over_int4_size=round(teacher_bytes / result["int4"]["size_bytes"], 2),
        )
        out["teacher_over_int4_size_ok"] = out["teacher_over_int4_size"] >= TARGETS["teacher_over_int4_size_min"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--field", help="a qat stage field, e.g. activations, share_input_quantizers or int4.head_bits (default: one run)")
    ap.add_argument("--values", help="comma-separated values of --field; the first is the reference")
    ap.add_argument("--precisions", help="comma-separated qat precisions (int8, int4) for every value (default: RUN_DIR's)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a qat field fixed for every value, e.g. lr=1e-3 or int4.head_bits=4 (repeatable)",
    )
    ap.add_argument("--steps", type=int, default=100, help="QAT steps per value (the default recipe's count)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if bool(args.field) != bool(args.values):
        ap.error("--field and --values go together")

    from dsk_compress import run_recipe
    from dsk_compress.io import atomic_write_json, read_json
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.tasks import build_task

    manifest = read_json(args.run_dir / "manifest.json")
    recipe = manifest["recipe"]
    stages = {st["stage"]: st for st in recipe["stages"]}
    base_qat = dict(stages["qat"], steps=args.steps)
    if args.precisions:
        base_qat["precisions"] = args.precisions.split(",")
    for item in args.set:
        field, _, value = item.partition("=")
        base_qat = set_field(base_qat, field, parse_value(value))
    export_cfg = {"opset": 17, "optimization": "extended", "qdq_min_sqnr_db": 30.0, "parity_atol": 1e-3, **stages.get("export", {})}
    student = args.run_dir.resolve() / next(st["outputs"]["model"] for st in manifest["stages"] if st["stage"] == "prune")
    task = build_task(dict(recipe["task"]))
    values = {v: parse_value(v) for v in args.values.split(",")} if args.field else {"run": None}
    results, base = {}, None
    with tempfile.TemporaryDirectory(prefix="qat-variants-") as tmp:
        for label, value in values.items():
            qat = set_field(base_qat, args.field, value) if args.field else base_qat
            name = f"qat-{args.field or 'precisions'}-{label}".replace("_", "-").replace(".", "-")
            spec = RecipeSpec.model_validate({**recipe, "name": name, "student": {"hf": str(student)}, "stages": [qat]})
            cache = args.run_dir / "teacher_logits"
            if spec.logit_cache.enabled and (cache / "cache.json").is_file():
                (Path(tmp) / label).mkdir()
                shutil.copytree(cache, Path(tmp) / label / "teacher_logits", copy_function=os.link)
            t0 = time.perf_counter()
            rd = run_recipe(spec, run_dir=Path(tmp) / label)
            entry = next(st for st in read_json(rd / "manifest.json")["stages"] if st["stage"] == "qat")
            m = read_json(rd / "qat" / "metrics.json")
            r: dict = {"float": m["float"], "qat_stage_seconds": entry["seconds"]}
            for precision in spec.stages[0].precisions:
                pm = m if precision == "int8" else m["int4"]
                work = Path(tmp) / f"{label}-{precision}"
                work.mkdir()
                model_dir = rd / "qat" / ("model" if precision == "int8" else "int4/model")
                score = score_int8 if precision == "int8" else score_int4
                r[precision] = {
                    "torch_fake_quant": {k: pm[k] for k in ("accuracy", "bits_per_byte")},
                    "after_calibration": pm["after_calibration"],
                    "final_loss": pm["train"].get("final_loss"),
                    "train_seconds": pm["train"].get("seconds"),
                    **score(model_dir, work, task, export_cfg),
                }
            if "int4" in r and base is None:
                work = Path(tmp) / "baselines"
                work.mkdir()
                base = baselines(student, work, task, export_cfg)
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results[label] = r
            print(label, json.dumps({p: {k: r[p][k]["accuracy"] for k in SCORES[p]} for p in SCORES if p in r}), flush=True)
    first = next(iter(results))
    delta = {
        label: {p: {k: round(r[p][k]["accuracy"] - results[first][p][k]["accuracy"], 4) for k in SCORES[p]} for p in SCORES if p in r}
        for label, r in results.items()
        if label != first
    }
    tb = teacher_size(args.run_dir, manifest)
    out = {
        "version": 3,
        "run": args.run_dir.name,
        "student": str(student.relative_to(args.run_dir.resolve())),
        "field": args.field,
        "qat_steps": args.steps,
        "set": args.set,
        "qat": {k: v for k, v in base_qat.items() if k not in (args.field, "steps")},
        "results": results,
    }
    if base is not None:
        out["baselines"] = {**base, "teacher_size_bytes": tb}
        out["targets"] = {"thresholds": TARGETS, **{label: targets(r, base, tb) for label, r in results.items() if "int4" in r}}
    if delta:
        out[f"accuracy_points_minus_{first}"] = delta
    atomic_write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("targets", f"accuracy_points_minus_{first}") if k in out}))


if __name__ == "__main__":
    main()
