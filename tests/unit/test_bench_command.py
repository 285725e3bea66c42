"""``dsk-compress bench`` on this machine (a run's artifacts, a bundle's run.py) and its refusals; over SSH: tests/remote."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import one_line_error, run_main, tiny_llama_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny finished run: distill 2 steps, fp32 export, bench (about 30 s)."""
    from dsk_compress import run_recipe

    d = tmp_path_factory.mktemp("bench-cmd")
    recipe = tiny_llama_recipe(
        d,
        "tiny-bench",
        [
            {"stage": "distill", "steps": 2, "batch_size": 4, "lr": 3e-3},
            {"stage": "export", "precisions": ["fp32"], "ptq_baselines": False, "kv_cache": False},
            {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
        ],
    )
    return run_recipe(str(recipe), out=d / "runs")


def test_recipe_run_records_torch_threads_and_the_bench_stages_onnxruntime_threads(tiny_run):
    from dsk_compress.devices import load_device

    m = json.loads((tiny_run / "manifest.json").read_text())
    assert m["threads"]["torch_threads"] >= 1 and m["threads"]["source"] in ("OMP_NUM_THREADS", "physical cores")
    bench = m["stages"][-1]["metrics"]["onnxruntime_threads"]
    assert bench == {"threads": load_device("host-cpu").threads, "source": "device profile host-cpu"}
    records = json.loads((tiny_run / "bench" / "results.json").read_text())["records"]
    assert {r["runtime"]["threads"] for r in records if r["runtime"]["name"] == "onnxruntime"} == {bench["threads"]}


def test_bench_run_here_adds_a_section_named_after_this_machine_and_reruns_safely(tiny_run, capsys):
    host = socket.gethostname()
    for _ in range(2):  # the second run replaces the first's records
        code, out, err = run_main(["bench", str(tiny_run), "--runs", "2"], capsys)
        assert code == 0, err
    saved = json.loads((tiny_run / "devices" / host / "results.json").read_text())
    assert [r["variant"] for r in saved["records"]] == ["teacher", "student-distill"]
    assert all(r["provenance"]["location"] == "host" and r["provenance"]["hostname"] == host for r in saved["records"])
    report = json.loads((tiny_run / "report.json").read_text())
    (section,) = [d for d in report["devices"] if d["name"] == host]
    assert section["measurement"] == "measured" and [v["measured_on"] for v in section["variants"]] == [host, host]
    bench = {r["variant"]: r for r in json.loads((tiny_run / "bench" / "results.json").read_text())["records"]}
    for v in section["variants"]:  # same artifact, same arithmetic, same machine: the bench stage's accuracy
        assert v["accuracy"] == round(bench[v["name"]]["accuracy"]["metrics"]["accuracy"], 3)
    assert f"Device: {host} (measured)" in out


def test_bench_bundle_here_runs_its_run_py_and_merges_into_its_run(tiny_run, capsys):
    code, _, err = run_main(["export", str(tiny_run), "--device", "rpi4"], capsys)
    assert code == 0, err
    code, out, err = run_main(["bench", str(tiny_run / "bundles" / "rpi4"), "--runs", "2"], capsys)
    assert code == 0, err
    recs = json.loads((tiny_run / "devices" / socket.gethostname() / "results.json").read_text())["records"]
    run_py = [r for r in recs if r["provenance"]["tool"] == "run.py"]
    assert len(run_py) == 1 and run_py[0]["variant"] == "student-distill" and run_py[0]["provenance"]["location"] == "device"
    assert (tiny_run / "devices" / socket.gethostname() / "raw" / "student-distill" / "run.log").is_file()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--host", "-oProxyCommand=touch x", "--device", "rpi5"], "not a valid SSH host"),
        (["--host", "pi@board"], "--host needs --device with a run"),
        (["--device", "rpi5"], "bench.device rpi5 is an aarch64 device and this host is x86_64"),
        (["--batches", "1,8"], "--batches goes with --host (or a bundle)"),
    ],
)
def test_bench_refusals_are_one_line(tiny_run, capsys, args, says):
    import platform

    if "rpi5" in args and "--host" not in args and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the architecture refusal is written for an x86-64 host")
    code, _, err = run_main(["bench", str(tiny_run), *args], capsys)
    assert says in one_line_error(code, err)
    assert not (tiny_run / "bundles" / "rpi5").exists()  # refused before exporting anything


def test_bench_refuses_what_is_neither_a_run_nor_a_bundle(tmp_path, capsys):
    code, _, err = run_main(["bench", str(tmp_path)], capsys)
    assert "neither a run directory" in one_line_error(code, err)


def test_recipe_with_a_bench_device_of_another_architecture_is_refused_before_it_runs(tmp_path, capsys):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("written for an x86-64 host")
    code, _, err = run_main(["recipe", "quant-prune-distill", "--set", "stages.4.device=rpi5", "--dry-run"], capsys, cwd=tmp_path)
    line = one_line_error(code, err)
    assert "stages.4.device: bench.device rpi5 is an aarch64 device" in line and "dsk-compress bench RUN --device rpi5 --host" in line


# --------------------------------------------------------------------------- several variants in one session (issue 24, item 6)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run (same folder name: a bundle in it finds its run), so the host's records stay the module's."""
    import shutil

    dst = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("devices", "bundles"))
    return dst


def test_multi_variant_bundle_run_py_writes_one_record_per_variant_and_the_device_section_lists_them(run_copy, capsys):
    from dsk_compress.export.bundle import make_bundle

    host_rows = [v["name"] for v in json.loads((run_copy / "report.json").read_text())["variants"] if " [" not in v["name"]]
    bundle = make_bundle(run_copy, "rpi4", run_copy / "bundles" / "rpi4+variants", variants="all")
    card = json.loads((bundle / "model_card.json").read_text())
    assert [e["variant"] for e in card["variants"]] == host_rows == ["teacher", "student-distill"]
    shipped = next(e for e in card["variants"] if e["variant"] == card["variant"])
    assert shipped["model"] == "model.onnx" and (bundle / "variants" / "teacher" / "model.onnx").is_file()
    assert not (bundle / "variants" / card["variant"]).exists()  # the shipped graph is not copied twice

    code, out, err = run_main(["bench", str(bundle), "--runs", "2", "--variants", "all", "--batches", "1,3"], capsys)
    assert code == 0, err
    results = run_copy / "devices" / socket.gethostname()
    recs = json.loads((results / "results.json").read_text())["records"]
    assert all([b["batch_size"] for b in r["timing"]["batches"]] == [1, 3] for r in recs)
    assert [(r["variant"], r["artifact"], r["provenance"]["tool"]) for r in recs] == [
        ("teacher", "variants/teacher/model.onnx", "run.py"),
        ("student-distill", "model.onnx", "run.py"),
    ]
    host = {r["variant"]: r for r in json.loads((run_copy / "bench" / "results.json").read_text())["records"]}
    for r in recs:  # the same graph, windows and arithmetic on the same machine: the host's accuracy exactly
        assert r["accuracy"]["metrics"]["accuracy"] == host[r["variant"]]["accuracy"]["metrics"]["accuracy"]
    assert len({r["memory"]["peak_rss_mb"] for r in recs}) == 2  # each variant in its own process: its own peak
    (section,) = [d for d in json.loads((run_copy / "report.json").read_text())["devices"] if d["name"] == socket.gethostname()]
    assert [v["name"] for v in section["variants"]] == host_rows and section["pareto"]
    assert all(v["accuracy_delta_vs_host"] == 0 for v in section["variants"])
    md = (run_copy / "report.md").read_text()
    device_md = md[md.index(f"Device: {socket.gethostname()}") :]
    assert all(f"| {name} " in device_md for name in host_rows)
    assert (results / "raw" / "rpi4+variants" / "run.log").is_file()
    assert "2 result(s)" in out


def test_run_py_refuses_a_variant_the_bundle_does_not_carry_in_one_line(run_copy):
    import subprocess
    import sys

    from dsk_compress.export.bundle import make_bundle

    bundle = make_bundle(run_copy, "rpi4", run_copy / "bundles" / "rpi4+variants", variants=["teacher"])
    assert [e["variant"] for e in json.loads((bundle / "model_card.json").read_text())["variants"]] == ["teacher"]
    r = subprocess.run([sys.executable, "run.py", "--variant", "teacher,nope"], cwd=bundle, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --variant 'teacher,nope': this bundle carries teacher (or all)"
    assert not (bundle / "results.json").exists()


def test_bench_variants_refusals_are_one_line(run_copy, capsys):
    code, _, err = run_main(["bench", str(run_copy), "--variants", "all"], capsys)
    assert "--variants goes with --host" in one_line_error(code, err)
    code, _, err = run_main(["bench", str(run_copy), "--device", "rpi4", "--host", "pi@board", "--variants", "nope"], capsys)
    assert "the run has no exported variant 'nope'" in one_line_error(code, err)
    code, _, err = run_main(["bench", str(run_copy), "--device", "rpi4", "--host", "pi@board", "--variants", "a/b"], capsys)
    assert "--variants: variant 'a/b' holds a path separator" in one_line_error(code, err)


def test_run_py_refuses_a_variant_entry_that_leaves_the_bundle_in_one_line(run_copy):
    import subprocess
    import sys

    from dsk_compress.export.bundle import make_bundle

    bundle = make_bundle(run_copy, "rpi4", run_copy / "bundles" / "rpi4+variants", variants="all")
    card = json.loads((bundle / "model_card.json").read_text())
    card["variants"][0]["model"] = "../../manifest.json"
    (bundle / "model_card.json").write_text(json.dumps(card))
    r = subprocess.run([sys.executable, "run.py", "--variant", "all"], cwd=bundle, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "model '../../manifest.json' is outside the bundle" in r.stderr


def test_a_device_session_gets_an_hour_per_variant_unless_told():
    from dsk_compress.benchmark import VARIANT_TIMEOUT_S, session_timeout

    card = {"variant": "final", "variants": [{"variant": v} for v in ("teacher", "final", "final-int4")]}
    assert session_timeout(None, card, None) == VARIANT_TIMEOUT_S
    assert session_timeout(None, card, "all") == 3 * VARIANT_TIMEOUT_S
    assert session_timeout(None, card, ["teacher", "final"]) == 2 * VARIANT_TIMEOUT_S
    assert session_timeout(90, card, "all") == 90
