"""Reports per device: bench records, device sections from RUN/devices/*/results.json, labels, merging, schema checks,
and report.html in headless Chromium (Debian's ``chromium``): every section shows its table and its decoded plot."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dsk_compress.errors import DeviceError, RunError
from dsk_compress.report import build_report, load_report, read_report, rebuild_report, record_row, render_markdown
from dsk_compress.runtimes.measure import SCHEMA, latency_stats
from dsk_compress.runtimes.result import BenchRecord, DeviceResults, parse_record

HOST_P50 = {"teacher": 10.0, "student": 4.0, "final": 2.5}
HOST_ACC = {"teacher": 70.0, "student": 68.0, "final": 67.5}


def record(
    variant,
    role,
    precision,
    acc,
    p50,
    *,
    measurement="measured",
    location="host",
    hostname="buildbox",
    ssh_host=None,
    machine="x86_64",
    tool="bench_worker",
    ep="CPUExecutionProvider",
    created="2026-11-30T00:00:00+00:00",
) -> dict:
    """A bench record as run.py or the bench worker writes it (plain JSON)."""
    return {
        "schema": SCHEMA,
        "schema_version": 1,
        "variant": variant,
        "role": role,
        "precision": precision,
        "artifact": f"export/{variant}.onnx",
        "size_bytes": 1000,
        "runtime": {
            "name": "onnxruntime",
            "version": "1.32.0",
            "mode": "extended",
            "execution_provider": ep,
            "providers": [ep],
            "device": "cpu",
            "threads": 4,
        },
        "provenance": {
            "measurement": measurement,
            "location": location,
            "device_profile": "rpi5",
            "hostname": hostname,
            "machine": machine,
            "cpu": "ARM implementer 0x41 part 0xd08" if machine == "aarch64" else "AMD EPYC",
            "cpu_count": 4,
            "os": "Linux 6.1",
            "python": "3.11.2",
            "source_run": "run-a",
            "ssh_host": ssh_host,
            "tool": tool,
            "created": created,
        },
        "timing": {
            "session_ms": 12.5,
            "first_inference_ms": 3.0,
            "warmup": 5,
            "runs": 30,
            "input_shape": [256],
            "output_shape": [1, 256, 256],
            "batches": [latency_stats([p50] * 3, 1, 256), latency_stats([p50 * 5] * 3, 8, 256)],
            "skipped": [{"batch_size": 64, "reason": "its output would take 1.1 GB"}],
        },
        "memory": {"peak_rss_mb": 120.0},
        "accuracy": {"task": "code-lm", "metrics": {"accuracy": acc, "bits_per_byte": 1.5}, "windows": 8, "tokens": 2040, "batch_size": 16},
    }


ARTS = {
    n: {"role": r, "params": 1_000_000, "path": f"export/{n}.onnx", "notes": f"{n} notes"}
    for n, r in (("teacher", "teacher"), ("student", "student"), ("final", "final"))
}


@pytest.fixture
def run(tmp_path) -> Path:
    """A run with host rows (from records) and two devices: an emulated rpi5 and a measured jetson."""
    from dsk_compress.recipes.stages.bench import host_rows

    recs = [parse_record(record(n, ARTS[n]["role"], "int8" if n == "final" else "fp32", HOST_ACC[n], HOST_P50[n])) for n in ARTS]
    rd = tmp_path / "run-a"
    build_report(rd, host_rows(recs, ARTS), {"run": "run-a", "recipe": "r", "task": "code-lm", "host": "buildbox (x86_64)"})
    write_device(
        rd,
        "rpi5",
        [
            record(
                "final",
                "final",
                "int8",
                67.48,
                40.0,
                measurement="emulated",
                location="device",
                hostname="board",
                ssh_host="pi@127.0.0.1:2222",
                machine="aarch64",
                tool="run.py",
            )
        ],
    )
    write_device(
        rd,
        "jetson-orin-nano",
        [
            record(
                "final",
                "final",
                "int8",
                67.5,
                7.0,
                location="device",
                hostname="orin",
                ssh_host="nvidia@orin",
                machine="aarch64",
                tool="run.py",
            ),
            record(
                "student",
                "student",
                "fp32",
                68.0,
                9.0,
                location="device",
                hostname="orin",
                ssh_host="nvidia@orin",
                machine="aarch64",
                tool="run.py",
            ),
        ],
    )
    rebuild_report(rd)
    return rd


def write_device(rd: Path, name: str, records: list[dict]) -> None:
    p = rd / "devices" / name / "results.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"schema": "dsk-compress/device-results", "schema_version": 1, "device": name, "records": records}))


def test_device_sections_hold_only_the_devices_own_numbers(run):
    rep = read_report(run)
    assert rep.schema_version == 2 and [d.name for d in rep.devices] == ["jetson-orin-nano", "rpi5"]
    assert all(v.device == "host" and v.measured_on == "buildbox" and v.measurement == "measured" for v in rep.variants)
    rpi, jet = rep.devices[1], rep.devices[0]
    assert (rpi.measurement, rpi.label, rpi.where, rpi.machine, rpi.tool) == (
        "emulated",
        "rpi5 (emulated)",
        "pi@127.0.0.1:2222",
        "aarch64",
        "run.py",
    )
    (final,) = rpi.variants
    # the device's latency and accuracy, never the host's; role, stage and parameters come from the host's row
    assert (final.p50, final.accuracy, final.device, final.measured_on) == (40.0, 67.48, "rpi5", "rpi5 (emulated)")
    assert final.accuracy_delta_vs_host == pytest.approx(-0.02) and final.params == 1_000_000 and final.role == "final"
    assert final.throughput_by_batch == {"1": 25.0, "8": 40.0} and final.session_ms == 12.5
    assert jet.label == "jetson-orin-nano (nvidia@orin)" and [v.name for v in jet.variants] == ["final", "student"]
    assert jet.pareto == ["final", "student"] and jet.variants[0].accuracy_delta_vs_host == 0
    host_p50 = {v.name: v.p50 for v in rep.variants}
    assert host_p50 == HOST_P50 and all(v.p50 not in host_p50.values() for d in rep.devices for v in d.variants)
    for f in ("pareto.png", "pareto-rpi5.png", "pareto-jetson-orin-nano.png"):
        assert (run / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_groups_rows_by_device_and_says_where_each_was_measured(run):
    md = (run / "report.md").read_text()
    assert "## Host: buildbox (x86_64)" in md and "## Device: rpi5 (emulated)" in md and "## Device: jetson-orin-nano (nvidia@orin)" in md
    assert "- **Devices:** jetson-orin-nano (nvidia@orin), rpi5 (emulated)" in md
    assert "| final | final | 1.00M | 0.00 | 67.48 | 1.500 | 40.00 | 40.00 | -0.020 | rpi5 (emulated) | onnxruntime-cpu | 25/40/— |" in md
    assert "| final | final | 1.00M | 0.00 | 67.50 | 1.500 | 2.50 | 2.50 | 4.00× | 1.00× | buildbox | onnxruntime-cpu | 400/640/— |" in md
    assert "timings are the emulator's, not the device's" in md
    assert md.index("## Device: jetson") < md.index("## Device: rpi5")


def test_rebuild_is_idempotent_and_a_newer_record_replaces_the_older_one(run):
    first = load_report(run)
    assert {k: v for k, v in rebuild_report(run).items() if k != "created"} == {k: v for k, v in first.items() if k != "created"}
    path = run / "devices" / "rpi5" / "results.json"
    old = DeviceResults.model_validate_json(path.read_text())
    newer = parse_record(
        record(
            "final",
            "final",
            "int8",
            67.4,
            41.0,
            measurement="emulated",
            location="device",
            hostname="board",
            ssh_host="pi@127.0.0.1:2222",
            machine="aarch64",
            tool="run.py",
            created="2026-12-01T00:00:00+00:00",
        )
    )
    other = parse_record(
        record(
            "final", "final", "int8", 67.4, 41.0, location="device", hostname="pi5b", ssh_host="pi@pi5b", machine="aarch64", tool="run.py"
        )
    )
    merged = old.merged([newer]).merged([other])
    assert [(r.accuracy.metrics["accuracy"], r.provenance.ssh_host) for r in merged.records] == [
        (67.4, "pi@127.0.0.1:2222"),
        (67.4, "pi@pi5b"),
    ]


def test_version_1_report_still_loads_and_renders(tmp_path):
    rd = tmp_path / "old"
    rd.mkdir()
    v = {"name": "final", "role": "final", "accuracy": 61.9, "latency_ms": {"p50": 11.2}, "runtime": "onnxruntime-cpu", "device": "rpi5"}
    (rd / "report.json").write_text(json.dumps({"schema_version": 1, "run": "old", "host": "box", "variants": [v]}))
    rep = load_report(rd)
    assert rep == {"schema_version": 1, "run": "old", "host": "box", "variants": [v]}  # unchanged: no devices key added
    md = render_markdown(rep)
    assert "- **Device:** rpi5" in md and "Measured on" not in md
    rebuild_report(rd)  # an old report gains the device sections (none here) and the new version
    assert load_report(rd)["schema_version"] == 2


def test_parse_record_refuses_other_files_newer_versions_and_bad_fields():
    good = record("final", "final", "int8", 60.0, 1.0)
    assert isinstance(parse_record(good), BenchRecord) and parse_record(good).to_dict()["schema"] == SCHEMA
    with pytest.raises(RunError, match="not a dsk-compress bench result"):
        parse_record({**good, "schema": "something-else"}, "x.json")
    with pytest.raises(RunError, match="schema_version 9, newer than the supported 1") as ei:
        parse_record({**good, "schema_version": 9}, "x.json")
    assert "upgrade dsk-compress" in ei.value.hint
    bad = json.loads(json.dumps(good))
    bad["provenance"]["measurement"] = "guessed"
    with pytest.raises(RunError, match=r"^x.json: provenance.measurement: Input should be 'measured' or 'emulated', got 'guessed'"):
        parse_record(bad, "x.json")
    bad = json.loads(json.dumps(good))
    bad["timing"]["batches"] = []
    with pytest.raises(RunError, match="timing.batches"):
        parse_record(bad, "x.json")


def test_record_row_names_the_metrics_of_a_text_model():
    r = record("student", "student", "fp32", 40.0, 2.0)
    r["accuracy"] = {"task": "text-lm", "metrics": {"accuracy": 40.0, "nll": 2.3, "perplexity": 9.97}}
    row = record_row(parse_record(r))
    assert row["bits_per_byte"] is None and row["metrics"] == {"accuracy": 40.0, "nll": 2.3, "perplexity": 9.97}


# --------------------------------------------------------------------------- the bench stage's place and runtimes


def test_bench_stage_refuses_a_profile_of_another_architecture():
    from dsk_compress.devices import load_device
    from dsk_compress.recipes.stages.bench import check_profile_fits_host

    here = "aarch64" if platform.machine() in ("aarch64", "arm64") else "x86_64"
    other = "host-cpu" if here == "aarch64" else "rpi5"
    with pytest.raises(DeviceError, match=rf"bench.device {other} is an \w+ device and this host is {here}") as ei:
        check_profile_fits_host(load_device(other))
    assert "dsk-compress bench RUN --device" in ei.value.hint
    check_profile_fits_host(load_device("rpi5" if here == "aarch64" else "gpu-server"))  # same architecture: its settings apply


def test_runtime_plans_per_artifact_and_host():
    from dsk_compress.devices import load_device
    from dsk_compress.recipes.stages.bench import Plan, runtime_plans

    cpu = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    server, host = load_device("gpu-server"), load_device("host-cpu")
    student = {"path": "export/student.onnx", "model_dir": "distill/model", "precision": "fp32"}
    assert runtime_plans(student, host, cpu, "x86_64", cuda=False, tensorrt=False) == [
        Plan("onnx", "export/student.onnx", ("CPUExecutionProvider",))
    ]
    plans = runtime_plans(student, server, gpu, "x86_64", cuda=True, tensorrt=True)
    assert [(p.kind, p.providers[:1], p.device, p.dtype, p.compile) for p in plans] == [
        ("onnx", ("CPUExecutionProvider",), "cpu", "float32", False),
        ("onnx", ("TensorrtExecutionProvider",), "cpu", "float32", False),
        ("onnx", ("CUDAExecutionProvider",), "cpu", "float32", False),
        ("torch", (), "cuda", "bfloat16", False),
        ("torch", (), "cuda", "bfloat16", True),
    ]
    final = {"path": "export/student-int8.onnx", "precision": "int8", "tensorrt": {"engine": "export/student-int8.gpu-server.engine"}}
    assert [p.kind for p in runtime_plans(final, server, cpu, "x86_64", cuda=True, tensorrt=True)] == ["onnx", "tensorrt"]
    assert [p.kind for p in runtime_plans(final, server, cpu, "x86_64", cuda=True, tensorrt=False)] == ["onnx"]
    teacher_torch = {"path": None, "model_dir": "export/teacher-torch"}
    assert runtime_plans(teacher_torch, host, cpu, "x86_64", cuda=False, tensorrt=False) == [Plan("torch", "export/teacher-torch")]


# --------------------------------------------------------------------------- report.html in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=5000",
]
# Added to a copy of the page only: reports what the browser made of each section once everything loaded.
PROBE = """<script>
window.addEventListener("load", () => {
  document.body.dataset.probe = JSON.stringify([...document.querySelectorAll("section.device")].map(s => ({
    device: s.dataset.device,
    rows: s.querySelectorAll("table tbody tr").length,
    headers: [...s.querySelectorAll("table thead th")].map(th => th.textContent),
    images: [...s.querySelectorAll("img.plot")].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
  })));
});
</script>"""


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("needs the chromium browser (Debian: apt-get install chromium; .ci/run installs it)")
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True, text=True, timeout=120)


def test_report_html_renders_every_section_with_its_table_and_plot_in_chromium(run, tmp_path):
    page = (run / "report.html").read_text()
    probe = tmp_path / "report-probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    r = _chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'<body data-probe="([^"]*)"', r.stdout)
    assert m, r.stdout[:2000]
    sections = json.loads(m.group(1).replace("&quot;", '"'))
    assert [s["device"] for s in sections] == ["host", "jetson-orin-nano", "rpi5"]
    assert [s["rows"] for s in sections] == [3, 2, 1]
    assert "Speedup" in sections[0]["headers"] and "Δ vs host" in sections[2]["headers"] and "Measured on" in sections[2]["headers"]
    for s in sections:  # one plot per section, decoded by the browser at the size matplotlib drew it
        assert s["images"] == [[True, 825, 528]], s
    shot = tmp_path / "report.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", (run / "report.html").as_uri())
    assert r.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_a_b_compares_runs_and_devices_row_by_row(run, tmp_path):
    import io

    from rich.console import Console

    from dsk_compress.report import compare_reports, comparison_rows, render_comparison

    other = tmp_path / "run-b"
    shutil.copytree(run, other)
    rows = comparison_rows(compare_reports([run, other]))
    assert len(rows) == 2 * (3 + 1 + 2)  # per run: 3 host rows, rpi5's one, the jetson's two
    first = [(r["run"], r["device"], r["variant"], r["measured_on"]) for r in rows[:6]]
    a = "run-a (run-a)"  # run-b is a copy of run-a (its report says run-a): the folder tells them apart (issue 24)
    assert first == [
        (a, "host", "teacher", "buildbox"),
        (a, "host", "student", "buildbox"),
        (a, "host", "final", "buildbox"),
        (a, "jetson-orin-nano", "final", "jetson-orin-nano (nvidia@orin)"),
        (a, "jetson-orin-nano", "student", "jetson-orin-nano (nvidia@orin)"),
        (a, "rpi5", "final", "rpi5 (emulated)"),
    ]
    assert {r["run"] for r in rows[6:]} == {"run-a (run-b)"}
    assert [r["recommended"] for r in rows[:6]] == [False, False, True, False, False, False]  # only a host row is recommended
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    render_comparison(compare_reports([run, other]), console)
    text = console.export_text()
    assert "rpi5 (emulated)" in text and "67.48" in text and "Measured on" in text


def test_report_lists_the_fused_operators_of_each_artifact_and_its_decoder_graph():
    """host_rows carries the export stage's fused_ops of the artifact and of the fused decoder graph it decoded with."""
    from dsk_compress.recipes.stages.bench import host_rows
    from dsk_compress.report import make_report
    from dsk_compress.report.html import render_html

    def decoded_with(graph):  # the bench stage's record names the decoder graph it decoded (measure_decodes)
        return parse_record(
            {
                **record("final", "final", "int8", 70.0, 1.0),
                "decode": {
                    "prompt_tokens": 128,
                    "new_tokens": 32,
                    "repeats": 3,
                    "prefill_ms": 4.0,
                    "decode_ms_p50": 0.3,
                    "decode_ms_p90": 0.4,
                    "decode_tokens_per_s": 3000.0,
                    "artifact": graph,
                },
            }
        )

    rec = decoded_with("export/student-int8.fused.onnx")
    art = {
        "role": "final",
        "path": "export/student-int8.onnx",
        "fused_ops": {"MatMulIntegerToFloat": 28, "QuickGelu": 4},
        "fused_path": "export/student-int8.fused.onnx",
        "kv_cache_path": "export/student-int8.kv.onnx",
        "fused": {"fused_ops": {"GroupQueryAttention": 4, "MatMulIntegerToFloat": 16, "SkipSimplifiedLayerNormalization": 8}},
    }
    (row,) = host_rows([rec], {"final": art})
    assert row["fused_ops"] == {"MatMulIntegerToFloat": 28, "QuickGelu": 4}
    assert row["decode"]["artifact"] == "export/student-int8.fused.onnx" and row["decode"]["fused_ops"]["GroupQueryAttention"] == 4
    md = render_markdown(make_report([row], {"run": "r"}))
    assert "fused ops: MatMulIntegerToFloat x28, QuickGelu x4" in md
    assert "greedy decode with `export/student-int8.fused.onnx`" in md and "decoder ops: GroupQueryAttention x4" in md
    page = render_html(make_report([row], {"run": "r"}))[0]
    assert "fused ops: MatMulIntegerToFloat x28" in page and "<code>export/student-int8.fused.onnx</code>" in page
    # decoded with the plain KV graph (no fused graph): no decoder ops are claimed
    (plain,) = host_rows([decoded_with("export/student-int8.kv.onnx")], {"final": {**art, "fused_path": None}})
    assert plain["decode"]["artifact"] == "export/student-int8.kv.onnx" and "fused_ops" not in plain["decode"]
