"""A recipe whose qat stage trains both precisions (``precisions: [int8, int4]``) from the same student: the export stage
writes the INT8 Q/DQ student and the int4 QAT student (MatMulNBits with its trained scales; full-sequence, KV-cache and
fused graphs, each checked against its fake quant), next to the post-training int4 baseline, and the report's table and
Pareto plot carry both QAT students with their size, accuracy and decode speed."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_llama_recipe

STAGES = [
    {"stage": "distill", "steps": 2, "batch_size": 4, "lr": 3e-3},
    {"stage": "prune", "ffn_ratio": 0.5, "steps": 2, "batch_size": 4},
    {"stage": "qat", "steps": 3, "batch_size": 4, "observer_steps": 1, "precisions": ["int8", "int4"]},
    {"stage": "export", "ptq_calibration_batches": 1, "precisions": ["fp32", "int8", "int4"]},
    {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from dsk_compress import load_recipe, run_recipe

    d = tmp_path_factory.mktemp("int4-recipe")
    recipe = tiny_llama_recipe(d, "tiny-int4", STAGES)
    rd = run_recipe(load_recipe(str(recipe)), run_dir=d / "run")
    return rd, json.loads((rd / "manifest.json").read_text())


def test_qat_stage_trains_one_student_per_precision_from_the_same_student(run):
    rd, manifest = run
    qat = next(st for st in manifest["stages"] if st["stage"] == "qat")
    assert qat["outputs"] == {"qat_model": "qat/model", "qat_int4_model": "qat/int4/model"}
    assert json.loads((rd / "qat/model/qat.json").read_text())["scheme"] == "int8"
    info = json.loads((rd / "qat/int4/model/qat.json").read_text())
    assert (info["scheme"], info["block_size"], info["head_bits"], info["embedding_bits"]) == ("int4", 32, 8, 8)
    m = qat["metrics"]
    assert m["train"]["steps"] == m["int4"]["train"]["steps"] == 3 and "accuracy" in m and "accuracy" in m["int4"]


def test_export_writes_both_qat_students_and_the_int4_baseline_checked(run):
    rd, manifest = run
    arts = next(st for st in manifest["stages"] if st["stage"] == "export")["outputs"]["artifacts"]
    final, int4 = arts["final"], arts["final-int4"]
    assert (final["precision"], int4["precision"], arts["student-int4"]["precision"]) == ("int8", "int4", "int4")
    assert int4["role"] == "final-int4" and int4["sqnr_db_vs_fake_quant"] >= 30 and int4["matmul_nbits"] == 8  # 7 Linears + head
    for kind in ("kv_cache", "fused"):
        assert int4[kind]["tokens_match"] and int4[kind]["step_logits_sqnr_db"] >= 30, kind
    assert int4["fused"]["fused_ops"]["MatMulNBits"] == 5 and "QuantizeLinear" not in int4["fused"]["fused_ops"]
    sizes = {k: (rd / arts[k]["path"]).stat().st_size for k in ("final", "final-int4", "student-int4")}
    # 4-bit layers vs 8-bit ones (both with an int8 embedding and head); int8 embedding vs the post-training graph's float one
    assert sizes["final-int4"] < sizes["final"] and sizes["final-int4"] < sizes["student-int4"]
    assert int4["params"] == arts["student-prune"]["params"]  # the block scales are not parameters of the model


def test_report_table_and_pareto_plot_show_int8_and_int4_qat_students(run):
    rd, _ = run
    report = json.loads((rd / "report.json").read_text())
    rows = {v["name"]: v for v in report["variants"]}
    for name in ("final", "final-int4", "student-int4"):
        assert rows[name]["accuracy"] is not None and rows[name]["size_bytes"] > 0 and rows[name]["latency_ms"]["p50"] > 0, name
    assert rows["final-int4"]["decode_tokens_per_s"] and rows["final"]["decode_tokens_per_s"]
    md = (rd / "report.md").read_text()
    assert "| final-int4 |" in md and "| final |" in md
    assert (rd / "pareto.png").stat().st_size > 0


def test_dry_run_shows_both_precisions(tmp_path):
    from dsk_compress import load_recipe
    from dsk_compress.recipes.runner import describe_plan

    plan = describe_plan(load_recipe(str(tiny_llama_recipe(tmp_path, "tiny-int4-plan", STAGES))))
    qat = next(st for st in plan if st["stage"] == "qat")
    assert qat["precisions"] == ["int8", "int4"] and qat["int4"] == {
        "block_size": 32,
        "scale_init": "mse",
        "head_bits": 8,
        "embedding_bits": 8,
        "steps": None,
    }
