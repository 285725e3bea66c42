"""A real bundle on the emulated aarch64 board over SSH: offline venv, run.py, results equal to the host's, labelled emulated.

The board is arm64 CPython 3.11 under QEMU user mode (tests/remote/board.py): correctness only, never
timings. Its first venv build (pip, numpy and onnxruntime under emulation) takes a few minutes; it is made
once per session by ``board_venv`` and reused by the bundle run.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest

from .board import pinned_wheels

pytestmark = pytest.mark.remote

PINS = dict(spec.split("==") for spec in pinned_wheels())
METRICS = {"accuracy", "bits_per_byte", "nll", "perplexity"}  # run.py's evaluation metric names
LOGITS_PY = (
    "import sys, numpy as np, onnxruntime as ort\n"
    "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
    "x = np.load(sys.argv[2]).astype(np.int64)\n"
    "np.save(sys.argv[3], s.run(None, {s.get_inputs()[0].name: x})[0])\n"
)


def _leaves(obj, path=()):
    """(key path, value) of every leaf of a JSON document: the checks below do not depend on run.py's layout."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    else:
        yield path, obj


def _metrics(res: dict) -> dict:
    return {path: v for path, v in _leaves(res) if path and path[-1] in METRICS and isinstance(v, float)}


def _machines(res: dict) -> set:
    return {v for path, v in _leaves(res) if path and path[-1] == "machine"}


@pytest.fixture(scope="session")
def board_venv(emulated_device, tiny_bundle, tmp_path_factory):
    """``ensure_venv`` twice on the board with the bundle's requirements and the aarch64 wheelhouse, in a folder of its
    own (the other remote tests share ``emulated_device.root``: one of them may have made this venv already)."""
    kw = {"root": str(tmp_path_factory.mktemp("board-venvs")), "wheelhouse": emulated_device.wheelhouse}
    with emulated_device.remote(command_timeout=1800) as dev:
        return dev.ensure_venv(tiny_bundle / "requirements.txt", **kw), dev.ensure_venv(tiny_bundle / "requirements.txt", **kw)


def test_board_python_is_arm64_and_detected_as_emulated(emulated_device):
    with emulated_device.remote() as dev:
        p = dev.probe()
    assert (p.python_machine, p.uname_machine) == ("aarch64", platform.machine())
    assert p.emulated and p.python_version.startswith("3.11.")
    assert p.cpu == "ARM implementer 0x41 part 0xd08"  # the board's /proc/cpuinfo (Cortex-A72), not the host's


def test_ensure_venv_on_the_board_installs_offline_then_reuses(emulated_device, board_venv):
    first, second = board_venv
    assert first.created and not second.created and second.path == first.path
    assert {k: first.packages[k] for k in ("numpy", "onnxruntime")} == {k: PINS[k] for k in ("numpy", "onnxruntime")}
    code = "import platform, sys, numpy, onnxruntime; print(platform.machine(), sys.prefix, numpy.__version__, onnxruntime.__version__)"
    with emulated_device.remote() as dev:
        out = dev.run([first.python, "-c", code], timeout=600).stdout.split()
    assert out == ["aarch64", first.path, PINS["numpy"], PINS["onnxruntime"]]


def test_run_bundle_on_the_board_equals_the_host_and_is_labelled_emulated(emulated_device, tiny_bundle, board_venv, tmp_path):
    host = tmp_path / "host.json"
    r = subprocess.run(
        [sys.executable, "run.py", "--runs", "3", "--warmup", "1", "--out", str(host)],
        cwd=tiny_bundle,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    host = json.loads(host.read_text())
    rdir = emulated_device.root / "bundles" / tiny_bundle.name
    kw = {"remote_root": str(rdir), "timeout": 900, **emulated_device.bundle_kwargs()}
    with emulated_device.remote() as dev:
        out = dev.run_bundle(tiny_bundle, out_dir=tmp_path / "dev", run_args=["--runs", "3", "--warmup", "1"], **kw)
        # a re-run sends nothing, reuses the venv and never returns the previous results.json
        again = dev.run_bundle(tiny_bundle, out_dir=tmp_path / "dev2", run_args=["--runs", "1", "--warmup", "0", "--no-eval"], **kw)
        # the fp32 logits themselves, on the bundle's evaluation windows
        dev.run(
            [board_venv[0].python, "-c", LOGITS_PY, str(rdir / "model.onnx"), str(rdir / "eval_windows.npy"), str(rdir / "logits.npy")],
            timeout=600,
        )
        arm_logits = np.load(dev.get(str(rdir / "logits.npy"), tmp_path / "arm_logits.npy"))
    res, prov = out["results"], out["provenance"]
    assert _machines(res) == {"aarch64"}  # what run.py itself saw
    assert prov["emulated"] is True and prov["measurement"] == "emulated"
    assert (prov["python_machine"], prov["uname_machine"]) == ("aarch64", platform.machine())
    assert prov["packages"]["onnxruntime"] == PINS["onnxruntime"] and not prov["venv_created"] and prov["wall_s"] > 0
    # same windows, same fp32 model: the same predictions (accuracy exactly), the same loss to float rounding
    arm, x86 = _metrics(res), _metrics(host)
    assert arm.keys() == x86.keys() and any(k[-1] == "accuracy" for k in arm)
    for k in arm:
        assert arm[k] == (x86[k] if k[-1] == "accuracy" else pytest.approx(x86[k], rel=1e-6, abs=1e-6)), k
    import onnxruntime as ort

    s = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    x86_logits = s.run(None, {s.get_inputs()[0].name: np.load(tiny_bundle / "eval_windows.npy").astype(np.int64)})[0]
    assert arm_logits.shape == x86_logits.shape and np.abs(arm_logits - x86_logits).max() <= 1e-4
    assert {p.name for p in (tmp_path / "dev").iterdir()} == {"results.json", "run.log", "provenance.json"}
    assert json.loads((tmp_path / "dev" / "provenance.json").read_text())["measurement"] == "emulated"
    assert sorted(out["transfer"]["sent"]) == sorted(p.name for p in tiny_bundle.iterdir())
    assert again["transfer"]["sent"] == [] and not again["provenance"]["venv_created"]
    assert not _metrics(again["results"]) and _machines(again["results"]) == {"aarch64"}


def test_run_py_run_directly_on_the_board_says_emulated_by_itself(tiny_bundle, board_venv, tmp_path):
    """Issue 24: a bundle's run.py run by hand on an emulated board (no dsk-compress bench, no --measurement flag) labels its
    results emulated: it detects the emulator itself (a native `uname -m` says x86_64 under its aarch64 Python)."""
    out = tmp_path / "results.json"
    r = subprocess.run(
        [board_venv[0].python, "run.py", "--runs", "1", "--warmup", "0", "--batches", "1", "--no-eval", "--out", str(out)],
        cwd=tiny_bundle,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert (res["provenance"]["machine"], res["provenance"]["measurement"]) == ("aarch64", "emulated")
    assert res["notes"].startswith(f"emulated: this aarch64 Python runs on a {platform.machine()} kernel")
    # the --measurement flag cannot make an emulated run "measured"
    r = subprocess.run(
        [
            board_venv[0].python,
            "run.py",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--batches",
            "1",
            "--no-eval",
            "--measurement",
            "measured",
            "--out",
            str(out),
        ],
        cwd=tiny_bundle,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0 and json.loads(out.read_text())["provenance"]["measurement"] == "emulated"
