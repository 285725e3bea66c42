"""Runs that are interrupted, shared, killed or tampered with: nothing lost, nothing cryptic.

Real ``dsk-compress`` processes on a tiny Llama teacher: Ctrl-C and SIGTERM (exit 130 / 143, stage
recorded as interrupted, the exact resume command printed); a second process on a running run refused
by name; ``kill -9`` mid-distill then ``--resume`` giving byte-identical weights; and every corruption a
tester tried on a finished run (damaged or missing model files, qat.json, checkpoint files, manifests,
ONNX artifacts) ending in one line naming the file and the command that rebuilds it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error, run_main, tiny_llama_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsk_compress.cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def main_line(capsys, *args: str) -> str:
    """The one error line of ``dsk-compress ARGS`` run through the entry point in this process (no interpreter start-up)."""
    return one_line_error(*run_main(list(args), capsys)[::2])


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def manifest(rd: Path) -> dict:
    return json.loads((rd / "manifest.json").read_text())


def wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not pred():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < timeout, "timed out waiting for the run"
        time.sleep(0.1)


LONG_DISTILL = [{"stage": "distill", "steps": 1_000_000, "batch_size": 2}]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "Ctrl-C (SIGINT)"), (signal.SIGTERM, 143, "SIGTERM")])
def test_interrupt_records_stage_prints_resume_command_and_exits_128_plus_signal(tmp_path, capsys, sig, code, said):
    recipe = tiny_llama_recipe(tmp_path, "tiny-sig", LONG_DISTILL)
    rd = tmp_path / "run"
    # Ctrl-C as a terminal delivers it: a background job of a non-interactive shell (nohup, `cmd &` in a script) starts
    # with SIGINT ignored and Python keeps it ignored, so the child gets the default disposition back before it starts
    p = subprocess.Popen(
        [sys.executable, "-m", "dsk_compress.cli.main", "recipe", str(recipe), "--run-dir", str(rd)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(
            lambda: (
                (rd / "manifest.json").is_file()
                and manifest(rd)["stages"][0]["status"] == "running"
                and (rd / "distill" / "init" / "config.json").is_file()
            ),
            p,
        )
        if sig == signal.SIGINT:
            # one run per folder: a second process (resume, rerun or a fresh run) is refused, naming the owner
            for extra in (["--resume"], ["--resume", "--rerun-from", "distill"], []):
                line = main_line(capsys, "recipe", str(recipe), "--run-dir", str(rd), *extra)
                assert f"{rd} is in use by pid {p.pid}" in line, line
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: stage 'distill' stopped by {said}")
    assert last.endswith(f"continue with: dsk-compress recipe {recipe} --run-dir {rd} --resume")
    m = manifest(rd)
    assert m["status"] == "interrupted" and m["stages"][0]["status"] == "interrupted" and m["stages"][0]["signal"] == said
    assert (rd / ".lock").read_text() == ""  # released


@pytest.mark.slow
def test_kill_9_mid_distill_then_resume_is_byte_identical_and_takes_over_the_stale_lock(tmp_path):
    stages = [{"stage": "distill", "steps": 160, "batch_size": 4}, {"stage": "prune", "ffn_ratio": 0.5, "steps": 3, "batch_size": 2}]
    recipe = tiny_llama_recipe(tmp_path, "tiny-k9", stages)
    ref = cli("recipe", str(recipe), "--run-dir", str(tmp_path / "ref"), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    rd = tmp_path / "killed"
    p = subprocess.Popen(
        [sys.executable, "-m", "dsk_compress.cli.main", "recipe", str(recipe), "--run-dir", str(rd)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        wait_for(lambda: (rd / "distill" / "checkpoint" / "state.json").is_file(), p)  # the first checkpoint (step 50)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    m = manifest(rd)
    assert m["stages"][0]["status"] == "running"  # killed outright: nothing could record it
    assert json.loads((rd / ".lock").read_text())["pid"] == p.pid  # the dead owner's record stays; its flock is gone
    res = cli("recipe", str(recipe), "--run-dir", str(rd), "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    m = manifest(rd)
    assert m["status"] == "done" and [s["status"] for s in m["stages"]] == ["done", "done"]
    for f in ("distill/model/model.safetensors", "prune/model/model.safetensors"):
        assert (rd / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


# ---- corrupt artifacts of a finished run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run) of a finished tiny distill -> prune -> qat -> export run, made through the CLI."""
    d = tmp_path_factory.mktemp("robust")
    recipe = tiny_llama_recipe(
        d,
        "tiny-corrupt",
        [
            {"stage": "distill", "steps": 6, "batch_size": 2},
            {"stage": "prune", "ffn_ratio": 0.5, "steps": 2, "batch_size": 2},
            {"stage": "qat", "steps": 2, "batch_size": 2, "observer_steps": 1},
            {"stage": "export", "ptq_baselines": False, "kv_cache": False},
        ],
    )
    import yaml

    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "keep_checkpoints": True}))  # the damaged-checkpoint tests below need them
    res = cli("recipe", str(recipe), "--out", str(d / "runs"), cwd=d)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (d / "runs").iterdir()
    return recipe, run


@pytest.fixture
def copy(finished, tmp_path) -> tuple[Path, Path]:
    recipe, run = finished
    rd = tmp_path / run.name
    shutil.copytree(run, rd)
    return recipe, rd


def test_finished_run_records_size_and_sha256_of_every_stage_file(finished):
    import hashlib

    _, run = finished
    m = manifest(run)
    for entry in m["stages"]:
        files = entry["files"]
        on_disk = {str(p.relative_to(run)) for p in (run / entry["stage"]).rglob("*") if p.is_file()}
        assert set(files) == on_disk and f"{entry['stage']}/metrics.json" in files
        for rel, rec in files.items():
            st = (run / rel).stat()
            assert rec == {"size": st.st_size, "sha256": hashlib.sha256((run / rel).read_bytes()).hexdigest(), "mtime_ns": st.st_mtime_ns}
    assert m["source"] == {"recipe": str(finished[0]), "overrides": []}
    # the tiny teacher is untrained: the distill stage measured it next to chance and said so
    t = m["stages"][0]["metrics"]["teacher"]
    assert t["accuracy"] < 2 * t["chance_accuracy"] and t["warning"].startswith("WARNING: the teacher scores")


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, target, stage",
    [
        ("flip", "distill/model/model.safetensors", "distill"),
        ("delete", "distill/model/config.json", "distill"),
        ("truncate", "prune/model/model.safetensors", "prune"),
        ("flip", "qat/model/qat.json", "qat"),
        ("delete", "qat/model/qat.json", "qat"),
    ],
)
def test_corrupt_or_missing_file_names_it_and_the_rebuild_command(copy, damage, target, stage, capsys):
    recipe, rd = copy
    p = rd / target
    if damage == "flip":
        _flip(p)
    elif damage == "delete":
        p.unlink()
    else:
        p.write_bytes(p.read_bytes()[:100])
    line = main_line(capsys, "recipe", str(recipe), "--run-dir", str(rd), "--resume", "--rerun-from", "export")
    assert str(p) in line and ("is corrupt" in line or "is missing" in line), line
    assert f"--run-dir {rd} --resume --rerun-from {stage}" in line
    # nothing was moved aside or rewritten by the refused attempt
    assert not list(rd.glob("export.replaced-*")) and manifest(rd)["stages"][3]["status"] == "done"


def _legacy(rd: Path) -> None:
    """As a run written before files were recorded: only the old checks stand."""
    m = manifest(rd)
    for e in m["stages"]:
        e.pop("files", None)
    (rd / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 1}', None])
def test_damaged_qat_json_without_hashes_is_one_line(copy, content, capsys):
    recipe, rd = copy
    _legacy(rd)
    q = rd / "qat" / "model" / "qat.json"
    if content is None:
        q.unlink()
    else:
        q.write_bytes(content)
    line = main_line(capsys, "recipe", str(recipe), "--run-dir", str(rd), "--resume", "--rerun-from", "export")
    assert "qat.json" in line


def _interrupted_at_qat(rd: Path) -> None:
    m = manifest(rd)
    m["stages"][2]["status"] = "interrupted"
    for e in m["stages"][2:]:
        e["status"] = "interrupted" if e["stage"] == "qat" else "pending"
        e.pop("files", None)
    m["status"] = "interrupted"
    (rd / "manifest.json").write_text(json.dumps(m))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("damage", ["truncate-optim", "pickle-optim", "state-without-step", "state-list"])
def test_damaged_checkpoint_of_an_interrupted_stage_is_one_line(copy, damage, capsys):
    import pickle

    recipe, rd = copy
    _interrupted_at_qat(rd)
    ck = rd / "qat" / "checkpoint"
    if damage == "truncate-optim":
        (ck / "optim.pt").write_bytes((ck / "optim.pt").read_bytes()[:500])
    elif damage == "pickle-optim":
        (ck / "optim.pt").write_bytes(pickle.dumps(_Payload()))
    elif damage == "state-without-step":
        st = json.loads((ck / "state.json").read_text())
        del st["step"]
        (ck / "state.json").write_text(json.dumps(st))
    else:
        (ck / "state.json").write_text("[1, 2]")
    line = main_line(capsys, "recipe", str(recipe), "--run-dir", str(rd), "--resume")
    assert str(ck) in line and "damaged" in line, line
    assert not (rd / "PWNED").exists()  # weights_only refused the pickle before it could run


@pytest.mark.parametrize("content", [b"[]", b'{"name": "x"}', b'{"stages": "x", "recipe": {}}', b"{corrupt", None])
def test_damaged_manifest_is_one_line_on_resume_export_and_report(copy, content, capsys):
    recipe, rd = copy
    if content is None:
        (rd / "manifest.json").unlink()
    else:
        (rd / "manifest.json").write_bytes(content)
    for args in (["recipe", str(recipe), "--run-dir", str(rd), "--resume"], ["export", str(rd), "--device", "rpi5"], ["report", str(rd)]):
        line = main_line(capsys, *args)
        assert "manifest" in line or "report.json" in line, line


def test_export_refuses_a_deleted_or_corrupt_onnx_artifact(copy, capsys):
    recipe, rd = copy
    onnx_files = sorted((rd / "export").glob("*.onnx"))
    onnx_files[0].unlink()
    line = main_line(capsys, "export", str(rd), "--device", "rpi5")
    assert str(onnx_files[0]) in line and "--rerun-from export" in line
    assert not (rd / "bundles").exists()


def test_export_without_hashes_still_loads_each_onnx_before_bundling(copy, capsys):
    recipe, rd = copy
    _legacy(rd)
    f = sorted((rd / "export").glob("*.onnx"))[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    line = main_line(capsys, "export", str(rd), "--device", "rpi5")
    assert str(f) in line and "does not load in ONNX Runtime" in line
    assert not (rd / "bundles").exists()


def test_report_json_without_fields_is_one_line(tmp_path, capsys):
    rd = tmp_path / "r"
    rd.mkdir()
    for content in ('{"schema_version": 1, "variants": [{"name": "x"}]}', '{"schema_version": 1}', '{"variants": "x"}', "[]", "{"):
        (rd / "report.json").write_text(content)
        code, out, err = run_main(["report", str(rd)], capsys)
        assert "report.json" in one_line_error(code, err)  # a row with a name only is no row the bench stage writes (issue 23)
