"""Unit tests for dsk_compress.report: derived numbers, Pareto front, recommendation, files, loading."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import re
import subprocess
import sys

import pytest

from dsk_compress.errors import RunError
from dsk_compress.report import (
    REPORT_SCHEMA_VERSION,
    Report,
    build_report,
    compare_reports,
    comparison_rows,
    format_params,
    load_report,
    make_report,
    pareto_front,
    read_report,
    render_comparison,
    render_markdown,
    render_summary_table,
)
from dsk_compress.report.model import parse_report


def variant(name, role, *, p50, acc, size, params=1_000_000, p99=None, bpb=None, runtime="onnxruntime-cpu", precision="fp32"):
    return {
        "name": name,
        "role": role,
        "stage": f"stage-{name}",
        "params": params,
        "size_bytes": size,
        "accuracy": acc,
        "bits_per_byte": bpb,
        "latency_ms": {"p50": p50, "p90": p50 * 1.2, "p99": p99 if p99 is not None else p50 * 1.5, "mean": p50 * 1.1},
        "throughput": 1000.0 / p50,
        "peak_memory_mb": None,
        "runtime": runtime,
        "device": "host-cpu",
        "precision": precision,
        "artifact": f"artifacts/{name}.onnx",
        "notes": "",
    }


@pytest.fixture
def variants():
    return [
        variant("teacher", "teacher", p50=10.0, p99=14.5, acc=90.0, size=40_000_000, params=12_345_678, bpb=0.8123),
        variant("student", "student", p50=4.0, acc=86.0, size=10_000_000, params=3_090_000),
        variant("final", "final", p50=2.5, p99=3.75, acc=88.5, size=8_000_000, params=3_090_000),
        variant("ptq-dynamic", "ptq-dynamic", p50=2.0, acc=85.0, size=5_000_000, params=3_090_000, precision="int8"),
    ]


META = {"run": "demo-run", "recipe": "moe-to-dense", "task": "code-lm", "host": "testbox"}


@pytest.fixture(scope="module")
def built_runs(tmp_path_factory):
    """Two finished runs written by build_report (matplotlib runs once per run, not per test)."""
    root = tmp_path_factory.mktemp("runs")
    vs = [
        variant("teacher", "teacher", p50=10.0, p99=14.5, acc=90.0, size=40_000_000, params=12_345_678, bpb=0.8123),
        variant("final", "final", p50=2.5, p99=3.75, acc=88.5, size=8_000_000, params=3_090_000),
        variant("ptq-static", "ptq-static", p50=2.0, acc=85.0, size=5_000_000, params=3_090_000),
    ]
    a = root / "run-alpha"
    b = root / "run-beta"
    build_report(a, vs, {**META, "run": "run-alpha"})
    vs_b = copy.deepcopy(vs)
    vs_b[1]["accuracy"] = 80.0
    build_report(b, vs_b, {**META, "run": "run-beta"})
    return a, b


# ----------------------------------------------------------------------------- derived numbers


def test_no_speedup_against_a_teacher_measured_by_another_runtime(variants):
    variants[0]["runtime"] = "torch-eager-cpu"  # export.teacher: torch (or an older run's fallback)
    by = {v["name"]: v for v in make_report(variants, META)["variants"]}
    assert by["final"]["speedup_vs_teacher"] is None and by["teacher"]["speedup_vs_teacher"] == 1.0
    assert by["final"]["size_ratio_vs_teacher"] == 5.0  # sizes and accuracy still compare


def test_derived_fields_computed_exactly_from_inputs(variants):
    rep = make_report(variants, META)
    by = {v["name"]: v for v in rep["variants"]}
    assert by["final"]["speedup_vs_teacher"] == 4.0  # 10 / 2.5
    assert by["final"]["size_ratio_vs_teacher"] == 5.0  # 40e6 / 8e6
    assert by["final"]["accuracy_delta_vs_teacher"] == pytest.approx(-1.5)
    assert by["student"]["speedup_vs_teacher"] == 2.5
    assert by["student"]["size_ratio_vs_teacher"] == 4.0
    assert by["ptq-dynamic"]["speedup_vs_teacher"] == 5.0
    assert by["ptq-dynamic"]["accuracy_delta_vs_teacher"] == pytest.approx(-5.0)
    assert by["teacher"]["speedup_vs_teacher"] == 1.0
    assert by["teacher"]["size_ratio_vs_teacher"] == 1.0
    assert by["teacher"]["accuracy_delta_vs_teacher"] == 0.0


def test_derived_fields_none_without_teacher(variants):
    rep = make_report(variants[1:], META)
    for v in rep["variants"]:
        assert v["speedup_vs_teacher"] is None
        assert v["size_ratio_vs_teacher"] is None
        assert v["accuracy_delta_vs_teacher"] is None
    assert rep["summary"]["teacher"] is None


def test_make_report_keeps_meta_and_does_not_mutate_input(variants):
    before = copy.deepcopy(variants)
    rep = make_report(variants, META)
    assert variants == before
    assert rep["schema_version"] == REPORT_SCHEMA_VERSION == 2
    assert (rep["run"], rep["recipe"], rep["task"], rep["host"]) == ("demo-run", "moe-to-dense", "code-lm", "testbox")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", rep["created"])
    assert [v["name"] for v in rep["variants"]] == ["teacher", "student", "final", "ptq-dynamic"]


def test_make_report_rejects_variant_missing_key(variants):
    del variants[2]["latency_ms"]
    with pytest.raises(RunError, match="final lacks latency_ms"):
        make_report(variants, META)


def test_make_report_rejects_duplicate_names(variants):
    variants[1]["name"] = "final"
    with pytest.raises(RunError, match="two variants"):
        make_report(variants, META)


# ----------------------------------------------------------------------------- pareto


def test_pareto_front_hand_made_set_returns_expected_indices():
    points = [
        (1.0, 50.0),  # 0 on front
        (2.0, 60.0),  # 1 on front
        (2.0, 55.0),  # 2 dominated by 1 (same latency, less accurate)
        (3.0, 60.0),  # 3 dominated by 1 (slower, same accuracy)
        (0.5, 40.0),  # 4 on front (fastest)
        (4.0, 70.0),  # 5 on front (most accurate)
        (4.0, 70.0),  # 6 identical to 5: neither dominates the other
        (5.0, 65.0),  # 7 dominated by 5
        (float("nan"), 99.0),  # 8 not a number: never on the front
    ]
    assert pareto_front(points) == [0, 1, 4, 5, 6]


def test_pareto_front_empty_and_single():
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 1.0)]) == [0]


def test_summary_pareto_names_variants(variants):
    rep = make_report(variants, META)
    # student (4 ms, 86 %) is dominated by final (2.5 ms, 88.5 %)
    assert rep["summary"]["pareto"] == ["teacher", "final", "ptq-dynamic"]


# ----------------------------------------------------------------------------- recommendation


def test_recommendation_picks_final_within_drop(variants):
    s = make_report(variants, META)["summary"]
    assert (s["teacher"], s["final"], s["recommended"]) == ("teacher", "final", "final")
    assert "88.50%" in s["recommendation"] and "4.00×" in s["recommendation"]


def test_recommendation_final_exactly_at_budget_counts_as_within(variants):
    variants[0]["accuracy"] = 90.1
    variants[2]["accuracy"] = 87.1  # 90.1 - 87.1 is 3.0 up to float rounding
    assert make_report(variants, META)["summary"]["recommended"] == "final"


def test_recommendation_falls_back_to_fastest_within_drop(variants):
    variants[2]["accuracy"] = 86.0  # final loses 4 points: outside the 3-point budget
    variants.append(variant("pruned", "pruned-oneshot", p50=5.0, acc=87.5, size=9_000_000))
    variants.append(variant("pruned-slow", "pruned-oneshot", p50=7.0, acc=89.0, size=9_000_000))
    s = make_report(variants, META)["summary"]
    assert s["recommended"] == "pruned"
    assert "loses 4.00 points" in s["recommendation"]


def test_recommendation_uses_max_accuracy_drop_from_meta(variants):
    s = make_report(variants, {**META, "max_accuracy_drop": 5.0})["summary"]
    assert s["recommended"] == "final"
    variants[2]["accuracy"] = 80.0
    s = make_report(variants, {**META, "max_accuracy_drop": 5.0})["summary"]
    assert s["recommended"] == "ptq-dynamic"  # 85.0 is within 5 points and 2.0 ms is fastest
    assert s["max_accuracy_drop"] == 5.0


def test_recommendation_teacher_when_nothing_compressed_within_drop(variants):
    s = make_report(variants, {**META, "max_accuracy_drop": 0.5})["summary"]
    assert s["recommended"] == "teacher"


def test_recommendation_without_teacher_prefers_final_then_most_accurate(variants):
    assert make_report(variants[1:], META)["summary"]["recommended"] == "final"
    no_final = [v for v in variants[1:] if v["role"] != "final"]
    assert make_report(no_final, META)["summary"]["recommended"] == "student"


def test_recommendation_empty_variants():
    s = make_report([], META)["summary"]
    assert s["recommended"] is None and s["pareto"] == []


# ----------------------------------------------------------------------------- files


def test_format_params_human_readable():
    assert format_params(12_345_678) == "12.35M"
    assert format_params(1_230_000) == "1.23M"
    assert format_params(45_600) == "45.60K"
    assert format_params(2_500_000_000) == "2.50B"
    assert format_params(999) == "999"
    assert format_params(None) == "—"


def test_build_report_writes_all_files(built_runs):
    a, _ = built_runs
    for name in ("report.json", "report.md", "report.html", "pareto.png"):
        assert (a / name).is_file(), name
    assert not list(a.glob(".*.tmp"))
    data = json.loads((a / "report.json").read_text())
    assert data["schema_version"] == 2
    assert data["summary"]["recommended"] == "final"
    assert (a / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_md_has_row_per_variant_with_formatted_numbers(built_runs):
    a, _ = built_runs
    md = (a / "report.md").read_text()
    lines = md.splitlines()
    assert "| Variant | Params | MB | Accuracy % | p50 ms | Speedup |" in lines  # the terminal's summary table first
    assert "| final | 3.09M | 8.00 | 88.50 | 2.50 | 4.00× |" in lines
    assert md.index("| Variant | Params | MB |") < md.index("| Variant | Role | Params |")  # then every column
    assert lines[0] == "# Compression report: run-alpha"
    assert "- **Recipe:** moe-to-dense" in lines and "- **Task:** code-lm" in lines
    assert "- **Host:** testbox" in lines and "- **Device:** host-cpu" in lines
    assert "| teacher | teacher | 12.35M | 40.00 | 90.00 | 0.812 | 10.00 | 14.50 | 1.00× | 1.00× | onnxruntime-cpu |" in lines
    assert "| final | final | 3.09M | 8.00 | 88.50 | — | 2.50 | 3.75 | 4.00× | 5.00× | onnxruntime-cpu |" in lines
    assert "| ptq-static | ptq-static | 3.09M | 5.00 | 85.00 | — | 2.00 | 3.00 | 5.00× | 8.00× | onnxruntime-cpu |" in lines
    table_rows = [ln for ln in lines if ln.startswith("| ") and "Variant" not in ln]
    assert len(table_rows) == 2 * 3  # the summary table and every column
    rec = [ln for ln in lines if ln.startswith("**Recommendation:**")]
    assert len(rec) == 1 and "`final`" in rec[0] and "1.50 points below" in rec[0]
    assert "batch size 1" in md and "runtime named in each row" in md
    lines = md.splitlines()


def test_report_html_is_self_contained(built_runs):
    a, _ = built_runs
    page = (a / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page and "<link" not in page
    for cell in ("88.50", "4.00×", "5.00×", "run-alpha"):
        assert cell in page
    b64 = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(b64) == (a / "pareto.png").read_bytes()


# ----------------------------------------------------------------------------- loading


def test_load_report_round_trips(built_runs):
    a, _ = built_runs
    rep = load_report(a)
    assert rep == json.loads((a / "report.json").read_text())


def test_load_report_missing_dir_raises_run_error(tmp_path):
    with pytest.raises(RunError, match="run directory not found") as e:
        load_report(tmp_path / "nope")
    assert "\n" not in e.value.message


def test_load_report_missing_file_raises_run_error(tmp_path):
    with pytest.raises(RunError, match="no report.json") as e:
        load_report(tmp_path)
    assert e.value.hint


def test_load_report_corrupt_json_raises_run_error(tmp_path):
    (tmp_path / "report.json").write_text('{"schema_version": 1, "variants": [')
    with pytest.raises(RunError, match="corrupt JSON") as e:
        load_report(tmp_path)
    assert "\n" not in e.value.message


def test_load_report_newer_schema_raises_run_error(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": REPORT_SCHEMA_VERSION + 1, "variants": []}))
    with pytest.raises(RunError, match="newer than the supported") as e:
        load_report(tmp_path)
    assert e.value.hint == "upgrade dsk-compress"


def test_load_report_not_a_report_raises_run_error(tmp_path):
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="not a report"):
        load_report(tmp_path)


# ----------------------------------------------------------------------------- data model


def test_report_model_round_trips_make_report_exactly(variants):
    variants[0]["params"] = 12_345_678  # ints stay ints, floats stay floats: the JSON does not change
    variants[1]["accuracy"] = 86
    variants[1]["decode_tokens_per_s"], variants[1]["decode"] = 812.3, {"prompt_tokens": 128, "decode_ms_p50": 1.2}
    variants[2]["tensorrt"] = {"precision": "int8", "problems": 0}  # a field a stage adds: carried through
    rep = make_report(variants, META)
    model = parse_report(json.loads(json.dumps(rep)))
    assert model.to_dict() == rep
    assert json.dumps(model.to_dict()) == json.dumps(rep)  # same keys, same order, same number types
    by = {v.name: v for v in model.variants}
    assert by["student"].accuracy == 86 and type(by["student"].accuracy) is int
    assert by["student"].decode.prompt_tokens == 128 and by["student"].p50 == 4.0
    assert by["final"].model_extra == {"tensorrt": {"precision": "int8", "problems": 0}}
    assert model.summary.recommended == "final" and model.summary.max_accuracy_drop == 3.0
    assert model.schema_version == REPORT_SCHEMA_VERSION


def test_read_report_returns_the_typed_model(built_runs):
    a, _ = built_runs
    model = read_report(a)
    assert isinstance(model, Report)
    assert [v.name for v in model.variants] == ["teacher", "final", "ptq-static"]
    assert model.variant("final").speedup_vs_teacher == 4.0 and model.variant("nope") is None
    assert model.to_dict() == load_report(a)


def _old_report():
    """A version-1 report as the first report code wrote it: no summary.distillation, no metrics/decode per variant."""
    v = variant("teacher", "teacher", p50=10.0, acc=90.0, size=40_000_000)
    v.update(speedup_vs_teacher=1.0, size_ratio_vs_teacher=1.0, accuracy_delta_vs_teacher=0.0)
    summary = {
        "teacher": "teacher",
        "final": None,
        "recommended": "teacher",
        "recommendation": "Ship `teacher`.",
        "pareto": ["teacher"],
        "max_accuracy_drop": 3.0,
    }
    return {
        "schema_version": 1,
        "run": "old-run",
        "recipe": "r",
        "task": "code-lm",
        "host": "box",
        "created": "2026-11-01T10:00:00+00:00",
        "variants": [v],
        "summary": summary,
    }


def test_load_report_reads_an_old_report_without_optional_fields(tmp_path):
    old = _old_report()
    (tmp_path / "report.json").write_text(json.dumps(old))
    assert load_report(tmp_path) == old  # nothing added, nothing dropped
    model = read_report(tmp_path)
    assert model.summary.distillation == [] and model.variants[0].metrics is None and model.variants[0].decode is None
    md = render_markdown(model)
    assert "| teacher | teacher | 1.00M | 40.00 | 90.00 |" in md and "Distillation" not in md


def test_load_report_reads_a_minimal_report(tmp_path):
    # what a hand-made run (or tests/unit/test_trt_export.py) writes: no summary, variants with a few keys
    minimal = {
        "schema_version": 1,
        "host": "test",
        "variants": [
            {
                "name": "final",
                "role": "final",
                "precision": "int8",
                "artifact": "export/x.onnx",
                "accuracy": 31.2,
                "latency_ms": {"p50": 1.0},
                "runtime": "onnxruntime-cpu",
            }
        ],
    }
    (tmp_path / "report.json").write_text(json.dumps(minimal))
    assert load_report(tmp_path) == minimal
    console = _console()
    render_summary_table(load_report(tmp_path), console)
    assert "31.20" in console.export_text()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda r: r["variants"][0].update(accuracy="high"),
            "variants.0.accuracy (variant 'teacher'): Input should be a number, got 'high'",
        ),
        (lambda r: r["variants"][0].update(params=True), "variants.0.params (variant 'teacher'): Input should be a number"),
        (lambda r: r["variants"][0]["latency_ms"].update(p50=[1]), "variants.0.latency_ms.p50 (variant 'teacher')"),
        (lambda r: r["variants"][0].pop("name"), "variants.0.name: Field required"),
        (lambda r: r["summary"].update(recomended="x"), "summary.recomended: Extra inputs are not permitted"),
        (lambda r: r["summary"].update(pareto="teacher"), "summary.pareto: Input should be a valid list"),
        (lambda r: r.update(host=3), "host: Input should be a string or a mapping, got 3"),
    ],
)
def test_load_report_malformed_field_raises_one_line_run_error_naming_file_and_field(tmp_path, change, field):
    rep = _old_report()
    change(rep)
    (tmp_path / "report.json").write_text(json.dumps(rep))
    with pytest.raises(RunError) as e:
        load_report(tmp_path)
    assert e.value.message.startswith(f"{tmp_path / 'report.json'}: {field}")
    assert "\n" not in e.value.message and e.value.hint


def test_report_command_prints_malformed_field_in_one_line_exit_2(tmp_path):
    rep = _old_report()
    rep["variants"][0]["accuracy"] = "high"
    (tmp_path / "report.json").write_text(json.dumps(rep))
    proc = subprocess.run(
        [sys.executable, "-m", "dsk_compress.cli.main", "report", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'report.json'}: variants.0.accuracy (variant 'teacher'): Input should be a number, got 'high' "
        "(hint: delete it and re-run the report stage)"
    ]


def test_make_report_rejects_malformed_variant_value_naming_it(variants):
    variants[2]["accuracy"] = "88.5"
    with pytest.raises(RunError) as e:
        make_report(variants, META)
    assert e.value.message == "variant final: accuracy: Input should be a number, got '88.5'"
    assert e.value.hint == "re-run the benchmark stage"


# ----------------------------------------------------------------------------- console


def _console(width: int = 200):
    from rich.console import Console

    return Console(file=io.StringIO(), width=width, record=True, color_system=None)


def test_compare_output_contains_both_run_names(built_runs):
    a, b = built_runs
    reports = compare_reports([a, b])
    rows = comparison_rows(reports)
    assert [(r["run"], r["variant"]) for r in rows][:2] == [("run-alpha", "teacher"), ("run-alpha", "final")]
    assert {r["run"] for r in rows} == {"run-alpha", "run-beta"}
    beta_final = next(r for r in rows if r["run"] == "run-beta" and r["variant"] == "final")
    assert beta_final["accuracy"] == 80.0 and beta_final["speedup"] == 4.0 and beta_final["size_mb"] == 8.0
    assert not beta_final["recommended"]  # run-beta's final loses 10 points
    console = _console()
    render_comparison(reports, console)
    text = console.export_text()
    assert "run-alpha" in text and "run-beta" in text
    assert "88.50" in text and "80.00" in text and "4.00×" in text


def test_compare_reports_errors_on_missing_run(built_runs, tmp_path):
    a, _ = built_runs
    with pytest.raises(RunError):
        compare_reports([a, tmp_path / "missing"])
    with pytest.raises(RunError):
        compare_reports([])


def test_render_summary_table_prints_rows_and_recommendation(built_runs):
    a, _ = built_runs
    console = _console()
    render_summary_table(load_report(a), console)
    text = console.export_text()
    for cell in ("teacher", "ptq-static", "12.35M", "88.50", "4.00×", "5.00×", "Recommendation:"):
        assert cell in text
    assert "8.00×" not in text and "0.812" not in text  # size ratio and bits/byte: --wide
    wide = _console()
    render_summary_table(load_report(a), wide, "wide")
    wide_text = wide.export_text()
    assert "8.00×" in wide_text and "0.812" in wide_text


def test_render_summary_table_keeps_brackets_in_names(variants):
    variants[1]["name"] = "student[kd]"
    console = _console()
    render_summary_table(make_report(variants, META), console)
    assert "student[kd]" in console.export_text()


# ----------------------------------------------------------------------------- import weight


def test_import_package_stays_light():
    code = (
        "import sys, dsk_compress, dsk_compress.report; "
        "heavy = [m for m in ('matplotlib', 'rich', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "import dsk_compress as d; assert not hasattr(d, 'build_report')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_speedup_none_when_latency_zero(variants):
    variants[2]["latency_ms"]["p50"] = 0.0
    v = make_report(variants, META)["variants"][2]
    assert v["speedup_vs_teacher"] is None
    assert not math.isnan(v["size_ratio_vs_teacher"])


# ----------------------------------------------------------------------------- near chance: nothing to ship


def test_recommendation_ships_nothing_when_the_teacher_is_near_chance(variants):
    for v, acc in zip(variants, (2.17, 2.0, 2.1, 1.9)):
        v["accuracy"] = acc
    rep = make_report(variants, {**META, "chance_accuracy": 1.5})
    s = rep["summary"]
    assert s["recommended"] is None and s["chance_accuracy"] == 1.5
    assert not s["recommendation"].lower().startswith("ship `")
    assert "near chance" in s["recommendation"] and "2.17%" in s["recommendation"] and "1.50%" in s["recommendation"]
    md = render_markdown(rep)
    assert "**Recommendation:** Ship nothing" in md and "★" not in md


def test_recommendation_ships_nothing_near_chance_even_with_a_sound_teacher(variants):
    variants[0]["accuracy"] = 90.0
    for v in variants[1:]:
        v["accuracy"] = 50.0  # all far outside the budget: the most accurate would be picked, but it is near chance
    rep = make_report(variants, {**META, "max_accuracy_drop": 50.0, "chance_accuracy": 45.0})
    assert rep["summary"]["recommended"] is None and "near chance" in rep["summary"]["recommendation"]


def test_recommendation_unchanged_when_chance_is_far_below(variants):
    with_chance = make_report(variants, {**META, "chance_accuracy": 10.0})["summary"]
    without = make_report(variants, META)["summary"]
    assert with_chance["recommended"] == without["recommended"] == "final"
    assert with_chance["recommendation"] == without["recommendation"]


# ----------------------------------------------------------------------------- a table a 100-column terminal shows

LONG = [
    "teacher",
    "student-distill",
    "student-random-init-nokd",
    "student-prune",
    "ptq-dynamic",
    "ptq-static",
    "student-int4",
    "student-fp16",
    "final",
]


def _long_report(devices: bool = False) -> dict:
    vs = []
    for i, name in enumerate(LONG):
        v = variant(
            name,
            "teacher" if i == 0 else ("final" if name == "final" else name),
            p50=413.27 - 40 * i,
            acc=77.39 - i / 3,
            size=46_710_000 - 4_000_000 * i,
            params=11_610_000 - 1_000_000 * i,
            bpb=1.2134,
        )
        v["decode_tokens_per_s"] = 3768.04 if i else None
        v["throughput_by_batch"] = {"1": 100.0, "8": 712.4}
        v["measured_on"] = "buildbox-with-a-rather-long-hostname.example.org"
        vs.append(v)
    meta = {
        "run": "quant-prune-distill-20261207-043200",
        "recipe": "quant-prune-distill",
        "task": "code-lm (seq 256, 32640 validation tokens)",
        "host": "buildbox (x86_64, AMD EPYC 7B13): 2 threads (profile host-cpu), batch 1, seq 256",
    }
    return make_report(vs, meta)


def _cells_whole(text: str) -> None:
    assert "…" not in text, text  # rich's mark of a cut cell
    lines = text.splitlines()
    for name in LONG:
        assert any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", ln) for ln in lines), (name, text)
    for number in ("413.27", "11.61M", "46.71", "77.39", "3768.0", "1.00×"):
        assert number in text, (number, text)


def test_summary_table_fits_100_columns_without_cutting_a_cell():
    console = _console(100)
    render_summary_table(_long_report(), console)
    text = console.export_text()
    _cells_whole(text)
    assert max(map(len, text.splitlines())) <= 100
    header = next(ln for ln in text.splitlines() if ln.lstrip().startswith("Variant"))
    assert header.split() == ["Variant", "Params", "MB", "Accuracy", "%", "p50", "ms", "Speedup", "Decode", "tok/s"]
    # every row on one line: the table needs no folding at 100 columns
    for name in LONG:
        row = next(ln for ln in text.splitlines() if f" {name} " in f" {ln} ")
        assert len(row.split()) == 7 + (name == "final")  # 7 cells (and the final's ★ when recommended)


@pytest.mark.parametrize("width", [60, 80, 100, 120])
def test_wide_table_never_cuts_a_name_or_number_at_any_width(width):
    console = _console(width)
    render_summary_table(_long_report(), console, "wide")
    text = console.export_text()
    assert "…" not in text
    for name in LONG:  # names are never folded either
        assert any(f" {name} " in f" {ln} " for ln in text.splitlines()), (name, width)


def test_columns_option_picks_columns_and_refuses_unknown_names():
    from dsk_compress.report.format import COLUMN_KEYS, parse_columns

    assert parse_columns("accuracy, p99,runtime") == ("variant", "accuracy", "p99", "runtime")
    with pytest.raises(RunError, match="unknown column 'latency'") as e:
        parse_columns("accuracy,latency")
    assert "p50" in e.value.hint
    console = _console(100)
    render_summary_table(_long_report(), console, parse_columns("p99,runtime"))
    header = next(ln for ln in console.export_text().splitlines() if ln.lstrip().startswith("Variant"))
    assert header.split() == ["Variant", "p99", "ms", "Runtime"]
    from dsk_compress.cli.main import _COLUMN_KEYS

    assert _COLUMN_KEYS == tuple(COLUMN_KEYS)


def test_report_command_at_100_columns_cuts_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dsk_compress.cli.main import app
    from dsk_compress.report.build import write_report
    from dsk_compress.report.model import Report

    write_report(tmp_path, Report.model_validate(_long_report()))
    res = CliRunner().invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    _cells_whole(res.output)
    assert max(map(len, res.output.splitlines())) <= 100
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--columns", "accuracy,bogus"], env={"COLUMNS": "100"})
    assert res.exit_code != 0
    wide = CliRunner().invoke(app, ["report", str(tmp_path), "--wide"], env={"COLUMNS": "100"})
    assert wide.exit_code == 0 and "…" not in wide.output and "Runtime" in wide.output
    monkeypatch.delenv("COLUMNS", raising=False)
    off_terminal = CliRunner().invoke(app, ["report", str(tmp_path), "--wide"])  # a log: wide enough for every column
    assert off_terminal.exit_code == 0 and "…" not in off_terminal.output
    row = next(ln for ln in off_terminal.output.splitlines() if " student-random-init-nokd " in f" {ln} ")
    assert "onnxruntime-cpu" in row  # one line per row


def test_report_md_summary_table_matches_the_terminal_columns():
    md = render_markdown(_long_report())
    header = next(ln for ln in md.splitlines() if ln.startswith("| Variant"))
    assert header == "| Variant | Params | MB | Accuracy % | p50 ms | Speedup | Decode tok/s |"
