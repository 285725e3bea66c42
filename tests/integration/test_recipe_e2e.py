"""A small end-to-end recipe on a tiny MoE teacher: every stage runs for real, the report holds measured numbers."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from dsk_compress import run_recipe
from dsk_compress.errors import DskError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_moe_dir):
    import yaml

    d = tmp_path_factory.mktemp("e2e")
    data = {
        "name": "tiny",
        "teacher": {"hf": str(tiny_moe_dir)},
        "student": {"from_teacher": {"layers": [0, 2], "ffn_init": "top", "calibration_batches": 2}},
        "task": {"name": "code-lm", "seq_len": 64, "eval_sequences": 16},
        "stages": [
            {"stage": "distill", "steps": 30, "batch_size": 8, "lr": 3e-3, "baselines": ["nokd", "random-init", "random-init-nokd"]},
            {"stage": "prune", "ffn_ratio": 0.5, "steps": 5, "iterations": 2, "batch_size": 8, "baselines": ["oneshot"]},
            {"stage": "qat", "steps": 10, "batch_size": 8, "observer_steps": 2},
            {"stage": "export", "precisions": ["fp32", "int8", "int4"]},
            {"stage": "bench", "runs": 5, "warmup": 1},
        ],
    }
    p = d / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    rd = run_recipe(str(p), out=d / "runs")
    return rd


def test_e2e_report_has_all_variants_with_measured_numbers(finished_run):
    rep = json.loads((finished_run / "report.json").read_text())
    roles = {v["name"]: v["role"] for v in rep["variants"]}
    assert roles == {
        "teacher": "teacher",
        "student-distill": "student",
        "student-prune": "student",
        "student-nokd": "student-nokd",
        "student-random-init": "student-random-init",
        "student-random-init-nokd": "student-random-init-nokd",
        "pruned-oneshot": "pruned-oneshot",
        "ptq-dynamic": "ptq-dynamic",
        "ptq-static": "ptq-static",
        "final": "final",
        "student-int4": "student-int4",
    }
    for v in rep["variants"]:
        assert v["latency_ms"]["p50"] <= v["latency_ms"]["p90"] <= v["latency_ms"]["p99"]
        assert v["size_bytes"] == (finished_run / v["artifact"]).stat().st_size
        assert 0 <= v["accuracy"] <= 100 and v["runtime"] == "onnxruntime-cpu"
        assert v["peak_memory_mb"] > 0
        # measured on this host and labelled so (never with a device's name), at batch 1, 8 and 64
        assert (v["device"], v["measured_on"], v["measurement"]) == ("host", socket.gethostname(), "measured")
        assert set(v["throughput_by_batch"]) == {"1", "8", "64"} and v["session_ms"] > 0
    from dsk_compress.runtimes.result import read_device_results

    saved = read_device_results(finished_run / "bench" / "results.json")  # every record, validated against the schema
    assert [r.variant for r in saved.records] == [v["name"] for v in rep["variants"]]
    assert rep["schema_version"] == 2 and rep["devices"] == []
    by = {v["name"]: v for v in rep["variants"]}
    # INT8 Linear weights (embedding and LM head stay fp32, half of this tiny model): clearly smaller
    assert by["final"]["size_bytes"] < 0.75 * by["student-prune"]["size_bytes"]
    assert by["final"]["precision"] == "int8"
    for name in ("report.md", "report.html", "pareto.png", "manifest.json"):
        assert (finished_run / name).is_file()


def test_e2e_distilled_student_learned_something(finished_run):
    m = json.loads((finished_run / "distill" / "metrics.json").read_text())
    # KD training must improve on the teacher-derived init and land near the (tiny) teacher
    rep = json.loads((finished_run / "report.json").read_text())
    teacher = next(v for v in rep["variants"] if v["role"] == "teacher")
    assert m["accuracy"] > m["init"]["accuracy"] + 0.5
    assert m["accuracy"] > teacher["accuracy"] - 10


def test_e2e_baselines_trained_on_the_same_token_budget(finished_run):
    m = json.loads((finished_run / "distill" / "metrics.json").read_text())
    for name in ("nokd", "random-init", "random-init-nokd"):
        assert m[f"baseline_{name}"]["train"]["tokens"] == m["train"]["tokens"] > 0
    # each no-KD baseline starts from the very same weights as its KD counterpart, and never runs the teacher
    assert m["baseline_nokd"]["init"]["accuracy"] == m["init"]["accuracy"]
    assert m["baseline_random-init-nokd"]["init"]["accuracy"] == m["baseline_random-init"]["init"]["accuracy"]
    assert m["baseline_nokd"]["train"]["kd"]["teacher"] == m["baseline_random-init-nokd"]["train"]["kd"]["teacher"] == "none"
    assert m["baseline_random-init"]["train"]["kd"]["teacher"] == "online"


def test_e2e_report_states_the_distillation_margins(finished_run):
    rep = json.loads((finished_run / "report.json").read_text())
    acc = {v["name"]: v["accuracy"] for v in rep["variants"]}
    margins = {(m["variant"], m["baseline"]): m["margin"] for m in rep["summary"]["distillation"]}
    assert set(margins) == {
        ("student-distill", "student-nokd"),
        ("student-distill", "student-random-init"),
        ("student-random-init", "student-random-init-nokd"),
        ("student-distill", "student-random-init-nokd"),
    }
    for (a, b), margin in margins.items():
        assert margin == pytest.approx(acc[a] - acc[b], abs=1e-4)
    md = (finished_run / "report.md").read_text()
    assert "**Distillation" in md and "KD vs no KD, same init" in md
    assert "KD vs no KD, random FFN init" in (finished_run / "report.html").read_text()


def test_e2e_prune_halves_ffn_and_reports_mac_reduction(finished_run):
    m = json.loads((finished_run / "prune" / "metrics.json").read_text())
    assert [layer["ffn"] for layer in m["structure_after"]["layers"]] == [48, 48]
    assert [layer["ffn"] for layer in m["structure_before"]["layers"]] == [96, 96]
    assert m["params_after"] < m["params_before"] and 0.05 < m["mac_reduction"] < 0.5
    # progressive: 96 -> 68 (rounded to 8: 64 or 72) -> 48; one-shot: 96 -> 48 with the same fine-tune budget
    assert [it["structure"]["layers"][0]["ffn"] for it in m["iterations"]] in ([72, 48], [64, 48])
    one = m["baseline_oneshot"]["iterations"]
    assert [it["structure"]["layers"][0]["ffn"] for it in one] == [48]
    assert one[0]["train"]["steps"] == sum(it["train"]["steps"] for it in m["iterations"]) == 10


def test_e2e_export_parity_and_integer_ops(finished_run):
    arts = json.loads((finished_run / "export" / "metrics.json").read_text())["artifacts"]
    for name in ("teacher", "student-distill", "student-prune"):
        assert arts[name]["parity_max_abs_diff"] < 1e-3
    assert arts["final"]["integer_matmuls"] == arts["final"]["quantized_linears"] == 15  # 14 in the layers + the LM head
    assert arts["final"]["int8_embeddings"] == 1  # the embedding table stored as int8 rows + one scale per row
    assert arts["final"]["sqnr_db_vs_fake_quant"] > 30
    # the PTQ baselines quantize exactly the Linears QAT quantizes (the LM head too; not attention scores)
    n = arts["final"]["quantized_linears"]
    assert sum(v for k, v in arts["ptq-dynamic"]["fused_ops"].items() if k in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")) == n
    assert sum(v for k, v in arts["ptq-static"]["fused_ops"].items() if k in ("QLinearMatMul", "MatMulIntegerToFloat")) == n


def test_e2e_fused_decoder_graphs_are_checked_and_bench_decodes_with_them(finished_run):
    arts = json.loads((finished_run / "export" / "metrics.json").read_text())["artifacts"]
    for name in ("student-distill", "student-prune"):  # 2-layer students
        f = arts[name]["fused"]
        assert f["tokens_match"] and f["step_logits_max_abs_diff"] < 1e-3 and arts[name]["fused_path"] == f["path"]
        assert f["fused_ops"]["GroupQueryAttention"] == 2 and f["fused_ops"]["SkipSimplifiedLayerNormalization"] == 4
    f = arts["final"]["fused"]
    assert f["precision"] == "int8" and f["step_logits_sqnr_db"] > 30 and f["fused_ops"]["MatMulIntegerToFloat"] >= 4 * 2
    # int4 weight-only of the pruned student: full-sequence graph (scored and timed like every variant) + fused decoder graph
    i4 = arts["student-int4"]
    assert i4["precision"] == "int4" and i4["fused_ops"].get("MatMulNBits") == 7 * 2 + 1 and i4["sqnr_db_vs_fp32"] > 15
    assert i4["fused"]["fused_ops"]["MatMulNBits"] == 4 * 2 + 1 and i4["fused"]["step_logits_sqnr_db"] > 15
    # the bench stage decodes with the fused graphs (IO binding, preallocated KV buffers)
    rows = {v["name"]: v for v in json.loads((finished_run / "report.json").read_text())["variants"]}
    assert rows["student-int4"]["precision"] == "int4" and 0 < rows["student-int4"]["accuracy"] <= 100
    for name in ("student-distill", "student-prune", "final", "student-int4"):
        assert rows[name]["decode"]["artifact"] == arts[name]["fused_path"] and rows[name]["decode_tokens_per_s"] > 0
        dec = rows[name]["decode"]  # every repeat's figures travel with the medians
        assert len(dec["prefill_ms_runs"]) == len(dec["decode_tokens_per_s_runs"]) == dec["repeats"] >= 3, name


def test_e2e_int8_artifact_accuracy_close_to_qat_torch(finished_run):
    rep = json.loads((finished_run / "report.json").read_text())
    final = next(v for v in rep["variants"] if v["role"] == "final")
    qat = json.loads((finished_run / "qat" / "metrics.json").read_text())
    assert abs(final["accuracy"] - qat["accuracy"]) < 1.0


def test_e2e_manifest_records_versions_and_stage_status(finished_run):
    man = json.loads((finished_run / "manifest.json").read_text())
    assert man["status"] == "done" and man["versions"]["torch"]
    assert [s["status"] for s in man["stages"]] == ["done"] * 5
    assert all(s["seconds"] > 0 for s in man["stages"])


def test_resume_skips_done_stages_and_reruns_failed_one(finished_run, tmp_path):
    import shutil

    rd = tmp_path / "copy"
    shutil.copytree(finished_run, rd)
    man = json.loads((rd / "manifest.json").read_text())
    # simulate a bench stage that failed: earlier artifacts must be reused, not recomputed
    man["stages"][4]["status"] = "failed"
    man["status"] = "failed"
    (rd / "manifest.json").write_text(json.dumps(man))
    (rd / "report.json").unlink()
    before = (rd / "distill" / "model" / "model.safetensors").stat().st_mtime_ns
    from dsk_compress.recipes.runner import run_recipe as _run
    from dsk_compress.recipes.schema import RecipeSpec

    out = _run(RecipeSpec.model_validate(man["recipe"]), resume=rd)
    assert out == rd and (rd / "report.json").is_file()
    assert (rd / "distill" / "model" / "model.safetensors").stat().st_mtime_ns == before
    man2 = json.loads((rd / "manifest.json").read_text())
    assert man2["status"] == "done"


def test_resume_refuses_a_changed_recipe(finished_run, tmp_path):
    import shutil

    from dsk_compress.recipes.runner import run_recipe as _run
    from dsk_compress.recipes.schema import RecipeSpec

    rd = tmp_path / "copy"
    shutil.copytree(finished_run, rd)
    man = json.loads((rd / "manifest.json").read_text())
    changed = dict(man["recipe"])
    changed["seed"] = 5
    with pytest.raises(DskError, match="differs"):
        _run(RecipeSpec.model_validate(changed), resume=rd)


def test_rerun_from_bench_keeps_the_old_measurements_and_resumes_a_recipe_stored_before_new_fields(finished_run, tmp_path):
    import shutil

    from dsk_compress.recipes.runner import run_recipe as _run
    from dsk_compress.recipes.schema import RecipeSpec

    rd = tmp_path / "copy"
    shutil.copytree(finished_run, rd)
    man = json.loads((rd / "manifest.json").read_text())
    spec = RecipeSpec.model_validate(man["recipe"])
    del man["recipe"]["stages"][3]["kv_cache"]  # as stored by a version without that (defaulted) field
    (rd / "manifest.json").write_text(json.dumps(man))
    old_bench = json.loads((rd / "bench" / "metrics.json").read_text())
    with pytest.raises(DskError, match="--rerun-from 'nope': the run has no such stage"):
        _run(spec, resume=rd, rerun_from="nope")
    assert _run(spec, resume=rd, rerun_from="bench") == rd
    kept = list(rd.glob("bench.replaced-*"))
    assert len(kept) == 1 and json.loads((kept[0] / "metrics.json").read_text()) == old_bench
    man2 = json.loads((rd / "manifest.json").read_text())
    assert man2["status"] == "done" and [s["status"] for s in man2["stages"]] == ["done"] * 5
    assert (rd / "bench" / "metrics.json").is_file() and (rd / "report.json").is_file()


def test_failed_stage_keeps_earlier_artifacts(tmp_path, tiny_moe_dir):
    from dsk_compress.recipes.runner import run_recipe as _run
    from dsk_compress.recipes.schema import RecipeSpec

    spec = RecipeSpec.model_validate(
        {
            "name": "tiny-fail",
            "teacher": {"hf": str(tiny_moe_dir)},
            "student": {"from_teacher": {"layers": [0], "ffn_init": "random"}},
            "task": {"name": "code-lm", "seq_len": 32, "eval_sequences": 4},
            "stages": [{"stage": "distill", "steps": 2, "batch_size": 2}, {"stage": "prune", "ffn_ratio": 0.99, "round_to": 8, "steps": 0}],
        }
    )
    with pytest.raises(DskError, match="ffn_ratio"):
        _run(spec, run_dir=tmp_path / "r")
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert [s["status"] for s in man["stages"]] == ["done", "failed"]
    assert (tmp_path / "r" / "distill" / "model" / "model.safetensors").is_file()


def test_bundle_run_py_reproduces_report_accuracy(finished_run, tmp_path):
    import subprocess
    import sys

    from dsk_compress.export.bundle import make_bundle

    b = make_bundle(finished_run, "rpi5", tmp_path / "rpi5")
    assert {p.name for p in b.iterdir()} == {  # one copy of the weights: the fused decoder graph alone (a CPU-only device)
        "model.fused.onnx",
        "model_card.json",
        "run.py",
        "dsk_measure.py",
        "dsk_decoder.py",
        "dsk_trt.py",
        "requirements.txt",
        "README.md",
        "eval_windows.npy",
        ".dsk-bundle.json",
    }
    card = json.loads((b / "model_card.json").read_text())
    assert card["precision"] == "int8" and card["runtime"] == "onnxruntime" and card["source_run"] == finished_run.name
    assert card["model"] == card["fused_model"] == "model.fused.onnx" and card["kv_model"] is None
    assert np.load(b / "eval_windows.npy").dtype == np.uint8  # code-lm: 256 byte values
    r = subprocess.run(
        [sys.executable, "run.py", "--runs", "3", "--generate", "4", "--prompt", "def f(", "--out", str(tmp_path / "res.json")],
        cwd=b,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    from dsk_compress.runtimes.result import parse_record

    res = parse_record(json.loads((tmp_path / "res.json").read_text()))  # the unified result schema, validated
    host = next(r for r in json.loads((finished_run / "bench" / "results.json").read_text())["records"] if r["variant"] == "final")
    # the fused graph scored here from an empty cache per window, with the same arithmetic (dsk_measure.score_windows): run.py's
    # accuracy exactly; and the host's full-sequence graph of the same QAT model agrees within int8 rounding flips
    from dsk_compress.runtimes import measure
    from dsk_compress.runtimes.decoder import FusedFullSequence
    from dsk_compress.runtimes.onnxruntime import make_session

    windows = np.load(b / "eval_windows.npy")
    correct, nll, count = measure.score_windows(
        FusedFullSequence(make_session(b / "model.fused.onnx")), windows, card["eval_batch_size"], card["logits_dtype"]
    )
    here = measure.lm_metrics(card["task"]["name"], correct, nll, count)
    assert res.accuracy.metrics["accuracy"] == pytest.approx(here["accuracy"], abs=1e-9)
    assert res.accuracy.metrics["accuracy"] == pytest.approx(host["accuracy"]["metrics"]["accuracy"], abs=0.1)
    assert res.accuracy.metrics["bits_per_byte"] == pytest.approx(host["accuracy"]["metrics"]["bits_per_byte"], abs=2e-3)
    assert res.timing.batches[0].p50 > 0 and [b.batch_size for b in res.timing.batches] == [1, 8, 64]
    assert (res.variant, res.precision, res.provenance.tool, res.provenance.source_run) == ("final", "int8", "run.py", finished_run.name)
    # greedy decode with the bundled fused graph (CPU): the prefill's token + 4 decode steps, decoded as bytes, and the
    # same tokens as the bundled plain KV-cache graph
    from dsk_compress.runtimes.decoder import KVCacheSession

    assert res.decode.artifact == "model.fused.onnx" and card["fused_model"] == "model.fused.onnx"
    assert len(res.decode.tokens) == 5 and res.decode.decode_tokens_per_s > 0
    kv = finished_run / "export" / "student-int8.kv.onnx"
    assert res.decode.tokens == KVCacheSession(kv).greedy(np.frombuffer(b"def f(", np.uint8), 5)[0].tolist()
    assert res.decode.text == bytes(t % 256 for t in res.decode.tokens).decode("utf-8", errors="replace")
    assert r.stdout.startswith("def f(" + res.decode.text)


def test_logit_cache_is_built_once_and_reused_by_later_stages(tmp_path, tiny_moe_dir):
    from dsk_compress.recipes.runner import run_recipe as _run
    from dsk_compress.recipes.schema import RecipeSpec

    spec = RecipeSpec.model_validate(
        {
            "name": "tiny-cache",
            "teacher": {"hf": str(tiny_moe_dir)},
            "student": {"from_teacher": {"layers": [0, 2], "ffn_init": "top", "calibration_batches": 2}},
            "task": {"name": "code-lm", "seq_len": 32, "eval_sequences": 4},
            "logit_cache": {"enabled": True, "top_k": 16},
            "stages": [
                {"stage": "distill", "steps": 8, "batch_size": 4},
                {"stage": "prune", "ffn_ratio": 0.5, "steps": 6, "batch_size": 4},
                {"stage": "qat", "steps": 4, "batch_size": 4, "observer_steps": 1},
            ],
        }
    )
    rd = _run(spec, run_dir=tmp_path / "r")
    kd = {s: json.loads((rd / s / "metrics.json").read_text()) for s in ("distill", "prune", "qat")}
    # distill: the teacher fills the cache for all 8 batches first (then it is released), and training reads them
    assert kd["distill"]["train"]["kd"] == {
        "teacher": "cached top-16 logits",
        "cache_hits": 8,
        "cache_misses": 0,
        "cache_filled_before_training": 8,
    }
    assert kd["prune"]["iterations"][0]["train"]["kd"]["cache_hits"] == 6
    assert kd["qat"]["train"]["kd"] == {"teacher": "cached top-16 logits", "cache_hits": 4, "cache_misses": 0}
    assert len(list((rd / "teacher_logits").glob("b*.safetensors"))) == 8
