"""Issue 24, device numbers that never lie, against the loopback sshd with this machine's own (x86) Python as the "board":

1. an x86 device under an arm profile (rpi5) is refused before anything is copied, or with --other-arch recorded under
   its own host name, never the profile's; run.py says emulated by itself under QEMU (test_board.py has the board);
2. Ctrl-C during a remote bench stops run.py on the device (exit 130, says what it stopped); a later bench stops a run.py
   an earlier one left;
3. the command ``export`` prints for the device is a venv recipe (PEP 668 systems refuse a bare pip install);
4. a full device disk (a 3 MB tmpfs as --remote-dir) is named with its free space and the space needed, and nothing
   half-made stays; permission denied is named; ``bench --clean HOST`` removes what earlier benches left;
5. host-key hints name ``[host]:port`` and the --known-hosts file in use, and work when run verbatim.

The bundles here are stand-ins (a run.py that sleeps or writes a minimal bench record; a one-file wheel), so each test
takes seconds.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.remote

REPO = Path(__file__).resolve().parents[2]

STUB_RUN_PY = """import argparse, json, platform, time
ap = argparse.ArgumentParser()
ap.add_argument("--out")
ap.add_argument("--sleep", type=float, default=0)
ap.add_argument("--measurement", default="measured")
ap.add_argument("--runs")
a, _ = ap.parse_known_args()
print("started", flush=True)
time.sleep(a.sleep)
json.dump({"schema": "dsk-compress/bench-result", "schema_version": 1, "variant": "final", "precision": "int8",
           "runtime": {"name": "onnxruntime", "version": "stand-in"}, "provenance": {"measurement": a.measurement, "location": "device",
           "machine": platform.machine(), "tool": "run.py", "device_profile": "DEVICE"}}, open(a.out, "w"))
"""


def _wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dist = "dsk_probe-1.0.dist-info"
    files = {
        "dsk_probe.py": "VERSION = '1.0'\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: dsk_probe\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    path = folder / "dsk_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def _stub_bundle(d: Path, device: str, sleep: float = 0) -> Path:
    """A bundle ``dsk-compress bench`` accepts (a model card for ``device``), whose run.py sleeps then writes a record."""
    b = d / f"stub-{device}"
    b.mkdir(parents=True)
    (b / "run.py").write_text(STUB_RUN_PY.replace("DEVICE", device).replace("default=0)", f"default={sleep})"))
    (b / "model.onnx").write_bytes(b"stand-in")
    (b / "model_card.json").write_text(json.dumps({"variant": "final", "device": device, "precision": "int8", "model": "model.onnx"}))
    (b / "requirements.txt").write_text("dsk-probe==1.0\n")
    _wheel(d / "wheels")
    return b


def _bench_args(ssh_server, known_hosts: Path, remote: Path, *extra: str) -> list[str]:
    return [
        "--host",
        ssh_server.host,
        "--identity",
        str(ssh_server.client_key),
        "--known-hosts",
        str(known_hosts),
        "--python",
        sys.executable,
        "--remote-dir",
        str(remote),
        *extra,
    ]


def _cli(args: list[str]):
    from dsk_compress.cli.main import app

    return CliRunner().invoke(app, args)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _gone(pid: int, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


# --------------------------------------------------------------------------- 1. architecture


def test_bench_refuses_an_x86_device_under_an_arm_profile_before_copying(ssh_server, known_hosts, tmp_path):
    bundle, remote = _stub_bundle(tmp_path, "rpi5"), tmp_path / "device"
    res = _cli(["bench", str(bundle), *_bench_args(ssh_server, known_hosts, remote, "--wheelhouse", str(tmp_path / "wheels"))])
    assert res.exit_code != 0, res.output
    err = str(res.exception)
    assert "is x86_64" in err and "not aarch64 like the rpi5 profile" in err and "--other-arch" in res.exception.hint
    assert not remote.exists()  # refused before anything was copied
    assert not (bundle / "results").exists()


def test_bench_other_arch_records_under_the_device_host_name_never_the_profile(ssh_server, known_hosts, tmp_path):
    bundle, remote = _stub_bundle(tmp_path, "rpi5"), tmp_path / "device"
    res = _cli(
        ["bench", str(bundle), *_bench_args(ssh_server, known_hosts, remote, "--wheelhouse", str(tmp_path / "wheels"), "--other-arch")]
    )
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    out = " ".join(res.output.split())
    assert "is x86_64, not aarch64" in out and "recorded under 127.0.0.1 (--other-arch), never as rpi5" in out
    assert sorted(p.name for p in (bundle / "results").glob("*.json")) == ["127.0.0.1.json"]
    saved = json.loads((bundle / "results" / "127.0.0.1.json").read_text())
    assert saved["device"] == "127.0.0.1" and saved["records"][0]["provenance"]["machine"] == "x86_64"


def test_check_device_fits_profile_names_another_arm_core():
    from dsk_compress.benchmark import check_device_fits_profile
    from dsk_compress.devices import load_device
    from dsk_compress.runtimes.remote import Probe, parse_host

    a72 = Probe("x86_64", "aarch64", "3.11.2", "CPython", "Linux", "/home/pi", "ARM implementer 0x41 part 0xd08", 4, True)
    warn = check_device_fits_profile(a72, load_device("rpi5"), parse_host("pi@board"))
    assert "Cortex-A72, not the Cortex-A76 of the rpi5 profile" in warn
    assert check_device_fits_profile(a72, load_device("rpi4"), parse_host("pi@board")) is None


# --------------------------------------------------------------------------- 2. Ctrl-C


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_run_py_on_the_device_and_exits_130(ssh_server, known_hosts, tmp_path, sig, code):
    bundle, remote = _stub_bundle(tmp_path, "gpu-server", sleep=300), tmp_path / "device"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    cmd = [
        sys.executable,
        "-m",
        "dsk_compress.cli.main",
        "bench",
        str(bundle),
        *_bench_args(ssh_server, known_hosts, remote, "--wheelhouse", str(tmp_path / "wheels")),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pidfile = remote / "bundles" / "bundle-gpu-server" / ".run.pid"
    deadline = time.monotonic() + 120
    while not (pidfile.is_file() and pidfile.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    pid = int(pidfile.read_text())
    time.sleep(0.5)  # run.py is running
    assert _alive(pid) and "run.py" in Path(f"/proc/{pid}/cmdline").read_text()
    proc.send_signal(sig)  # Ctrl-C, or SIGTERM from a scheduler or `kill`: both stop what runs on the device
    out, err = proc.communicate(timeout=180)  # stopping it takes a second ssh session: slow on a loaded machine
    assert proc.returncode == code, (out, err)
    assert f"interrupted: stopped on {ssh_server.host}: {pid} " in " ".join(err.split()) and "run.py" in err
    assert _gone(pid) and not pidfile.exists()


def test_a_stopped_variants_session_keeps_the_variants_it_finished(ssh_server, known_hosts, tmp_path):
    """run.py --variant rewrites results.json after each variant: a bench stopped (SIGTERM, Ctrl-C, --timeout) in the
    middle of the second variant keeps the first one's record."""
    bundle, remote = _stub_bundle(tmp_path, "gpu-server"), tmp_path / "device"
    first = (
        STUB_RUN_PY.replace("DEVICE", "gpu-server")
        .replace("default=0)", "default=0.1)")
        .replace(', open(a.out, "w"))', ", open(a.out + '.one', 'w'))")
    )
    (bundle / "run.py").write_text(
        first
        + "rec = json.load(open(a.out + '.one'))\n"
        + "json.dump({'schema': 'dsk-compress/variant-results', 'schema_version': 1, 'records': [rec], 'errors': []}, open(a.out, 'w'))\n"
        + "print('variant final-int4 (int4, variants/final-int4/model.onnx)', flush=True)\ntime.sleep(300)\n"
    )
    args = [
        "bench",
        str(bundle),
        *_bench_args(ssh_server, known_hosts, remote, "--wheelhouse", str(tmp_path / "wheels"), "--timeout", "30"),
    ]
    res = _cli(args)
    assert res.exit_code != 0 and "did not finish within 30 s" in str(res.exception), res.output
    assert "kept the 1 variant(s)" in " ".join(res.output.split())
    saved = json.loads((bundle / "results" / "gpu-server.json").read_text())
    assert [r["variant"] for r in saved["records"]] == ["final"] and saved["records"][0]["provenance"]["ssh_host"] == ssh_server.host


def test_a_later_bench_stops_a_run_py_an_earlier_one_left(ssh_server, known_hosts, tmp_path):
    bundle, remote = _stub_bundle(tmp_path, "gpu-server"), tmp_path / "device"
    rdir = remote / "bundles" / "bundle-gpu-server"
    rdir.mkdir(parents=True)
    (rdir / "run.py").write_text("import time\ntime.sleep(600)\n")
    # what an earlier bench whose ssh died leaves: timeout + run.py, its PID in the file
    stale = subprocess.Popen(
        [
            "sh",
            "-c",
            'echo $$ > "$1" && shift && exec "$@"',
            "sh",
            str(rdir / ".run.pid"),
            "timeout",
            "-k",
            "10",
            "600",
            sys.executable,
            str(rdir / "run.py"),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not ((rdir / ".run.pid").is_file() and (rdir / ".run.pid").read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        res = _cli(["bench", str(bundle), *_bench_args(ssh_server, known_hosts, remote, "--wheelhouse", str(tmp_path / "wheels"))])
        assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
        assert f"stopped a run.py an earlier bench left running on {ssh_server.host}: {stale.pid} timeout" in " ".join(res.output.split())
        stale.wait(timeout=15)
    finally:
        if stale.poll() is None:
            stale.kill()


# --------------------------------------------------------------------------- 3. printed device commands


def test_export_prints_a_venv_recipe_that_pep_668_systems_accept():
    from dsk_compress.export.bundle import DEVICE_RECIPE

    src = (REPO / "cli" / "main.py").read_text()
    assert "pip install -r requirements.txt && python3 run.py" not in src
    assert "DEVICE_RECIPE" in src
    cmd = DEVICE_RECIPE.split(" (")[0]
    steps = [shlex.split(s) for s in cmd.split("&&")]
    # every pip runs inside the bundle's venv, and run.py with the venv's Python
    assert steps[0] == ["python3", "-m", "venv", ".venv"]
    assert all(s[0].startswith(".venv/bin/") for s in steps[1:]) and steps[-1][-1] == "run.py"
    assert "python3-venv" in DEVICE_RECIPE


def test_export_recipe_runs_verbatim_over_ssh(ssh_server, known_hosts, tmp_path):
    """The printed recipe, run as printed in a bundle folder on the device (the system python3 there; pip's own environment
    variables PIP_NO_INDEX / PIP_FIND_LINKS point it at a local wheel), makes the venv, installs and runs run.py."""
    from dsk_compress.export.bundle import DEVICE_RECIPE
    from dsk_compress.runtimes.remote import Remote

    if subprocess.run(["python3", "-c", "import ensurepip, venv"], capture_output=True).returncode != 0:
        pytest.skip("this machine's python3 has no venv module (python3-venv)")
    b = _stub_bundle(tmp_path, "rpi5")
    (b / "run.py").write_text("import dsk_probe, sys\nprint('ran', dsk_probe.VERSION, sys.prefix)\n")
    cmd = DEVICE_RECIPE.split(" (")[0]
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=known_hosts) as r:
        out = r.run(
            [
                "env",
                "PIP_NO_INDEX=1",
                f"PIP_FIND_LINKS={tmp_path / 'wheels'}",
                "PIP_DISABLE_PIP_VERSION_CHECK=1",
                "sh",
                "-c",
                f"cd {shlex.quote(str(b))} && {cmd}",
            ],
            check=False,
            timeout=300,
        )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split()[-3:] == ["ran", "1.0", str(b / ".venv")]


# --------------------------------------------------------------------------- 4. remote failures


@pytest.fixture
def tiny_fs(tmp_path):
    """A 3 MB tmpfs (root only): the device's disk, full after a few MB."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_device_disk_is_named_with_free_and_needed_space_and_nothing_half_made_stays(ssh_server, known_hosts, tmp_path, tiny_fs):
    from dsk_compress.runtimes.remote import DiskFullError, Remote

    bundle = _stub_bundle(tmp_path, "gpu-server")
    (bundle / "model.onnx").write_bytes(os.urandom(5_000_000))  # more than the disk holds
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=known_hosts, python=sys.executable) as r:
        with pytest.raises(DiskFullError) as ei:
            r.run_bundle(
                bundle,
                out_dir=tmp_path / "out",
                remote_root=str(tiny_fs / "bundles" / "b"),
                venvs_root=str(tiny_fs / "venvs"),
                wheelhouse=tmp_path / "wheels",
            )
        msg = str(ei.value)
        assert f"the disk of {ssh_server.host} is full" in msg and "free under" in msg and "about 5.0 MB needed" in msg, msg
        assert "--clean" in ei.value.hint
        assert [p for p in tiny_fs.rglob("*") if p.is_file()] == []  # the partial copy was removed
        # a venv that does not fit (the venv of this Python with pip is bigger than 3 MB) is removed with its wheelhouse
        (bundle / "model.onnx").write_bytes(b"small")
        with pytest.raises(DiskFullError, match="creating the venv|installing requirements") as ei:
            r.ensure_venv(bundle / "requirements.txt", root=str(tiny_fs / "venvs"), wheelhouse=tmp_path / "wheels")
        assert "needed" in str(ei.value)
        assert [p for p in tiny_fs.rglob("*") if p.is_file()] == []  # neither the half venv nor its wheelhouse stays


def test_permission_denied_on_the_device_is_named(ssh_server, known_hosts, tmp_path):
    from dsk_compress.runtimes.remote import Remote, RemotePermissionError

    if os.geteuid() == 0:
        pytest.skip("root may write anywhere: the permission error needs a non-root login")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    bundle = _stub_bundle(tmp_path, "gpu-server")
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=known_hosts, python=sys.executable) as r:
        with pytest.raises(RemotePermissionError, match="permission denied"):
            r.put(bundle, str(locked / "b"))


def test_permission_error_text_is_recognised(ssh_server, known_hosts):
    from dsk_compress.runtimes.remote import Remote, RemotePermissionError

    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=known_hosts) as r:
        with pytest.raises(RemotePermissionError, match="permission denied on .*: copying.*Permission denied") as ei:
            r.raise_storage_error("tar: /opt/x: Cannot mkdir: Permission denied", "/opt/x", 10, "copying 1 file(s) to /opt/x")
    assert "--remote-dir" in ei.value.hint


def test_missing_python3_venv_is_named_and_leaves_no_half_venv(ssh_server, known_hosts, tmp_path):
    from dsk_compress.runtimes.remote import Remote, VenvError

    fake = tmp_path / "python3"  # Debian's python3 without python3-venv: `-m venv` makes the folder, then fails
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"\n'
        '  echo "The virtual environment was not created successfully because ensurepip is not available." >&2; exit 1\n'
        f'fi\nexec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    req = tmp_path / "requirements.txt"
    req.write_text("numpy\n")
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=known_hosts, python=str(fake)) as r:
        with pytest.raises(VenvError, match="python3-venv is not installed"):
            r.ensure_venv(req, root=str(tmp_path / "venvs"))
    assert list((tmp_path / "venvs").iterdir()) == []


def test_bench_clean_removes_what_earlier_benches_left_listing_sizes(ssh_server, known_hosts, tmp_path):
    remote = tmp_path / "device"
    (remote / "bundles" / "run-rpi5").mkdir(parents=True)
    (remote / "bundles" / "run-rpi5" / "model.onnx").write_bytes(b"x" * 300_000)
    (remote / "venvs" / "0123abcd" / "bin").mkdir(parents=True)
    (remote / "venvs" / "wheelhouse-abc").mkdir()
    (remote / "keep.txt").write_text("not ours")
    res = _cli(
        [
            "bench",
            "--clean",
            ssh_server.host,
            "--identity",
            str(ssh_server.client_key),
            "--known-hosts",
            str(known_hosts),
            "--remote-dir",
            str(remote),
        ]
    )
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    out = " ".join(res.output.split())
    assert f"removed {remote}/bundles/run-rpi5 (30" in out and f"removed {remote}/venvs/0123abcd" in out
    assert "removed 3 item(s)" in out
    assert list((remote / "bundles").iterdir()) == [] and list((remote / "venvs").iterdir()) == []
    assert (remote / "keep.txt").read_text() == "not ours"


# --------------------------------------------------------------------------- 5. host-key hints


def test_changed_host_key_hint_removes_the_port_entry_from_the_known_hosts_in_use(ssh_server, tmp_path):
    from dsk_compress.runtimes.remote import HostKeyError, Remote

    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "my known_hosts"
    kh.write_text(f"[127.0.0.1]:{ssh_server.port} " + " ".join(other.with_suffix(".pub").read_text().split()[:2]) + "\n")
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=kh) as r:
        with pytest.raises(HostKeyError, match="differs") as ei:
            r.run(["true"])
    cmd = ei.value.hint.split("remove the old key: ")[1]
    assert cmd == f"ssh-keygen -R '[127.0.0.1]:{ssh_server.port}' -f '{kh}'"
    subprocess.run(["sh", "-c", cmd], check=True, capture_output=True)  # verbatim
    assert f"[127.0.0.1]:{ssh_server.port}" not in kh.read_text()
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=kh, accept_new_host_key=True) as r:
        assert r.run(["echo", "ok"]).stdout == "ok\n"


def test_unknown_host_key_hint_adds_it_to_the_known_hosts_in_use(ssh_server, tmp_path):
    from dsk_compress.runtimes.remote import HostKeyError, Remote

    kh = tmp_path / "known_hosts"
    kh.write_text("")
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=kh) as r:
        with pytest.raises(HostKeyError, match=f"not in known_hosts \\({kh}\\)") as ei:
            r.run(["true"])
    cmd = ei.value.hint.split("add it (")[1].split("), or")[0]
    assert cmd == f"ssh-keyscan -p {ssh_server.port} 127.0.0.1 >> {kh}"
    subprocess.run(["sh", "-c", cmd], check=True, capture_output=True)
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=kh) as r:  # no flag needed now
        assert r.run(["echo", "ok"]).stdout == "ok\n"


# --------------------------------------------------------------------------- 6. report


def test_report_compare_tells_runs_of_one_name_apart_by_folder(tmp_path, monkeypatch):
    from dsk_compress.report import model

    monkeypatch.setattr(model, "load_report", lambda d: {"run": "quant-prune-distill-20261123-070000", "variants": []})
    runs = [tmp_path / f / "quant-prune-distill-20261123-070000" for f in ("a", "b")]
    got = [r["run"] for r in model.compare_reports([*runs, runs[0]])]
    assert got == [
        f"quant-prune-distill-20261123-070000 ({runs[0]}) #1",
        f"quant-prune-distill-20261123-070000 ({runs[1]})",
        f"quant-prune-distill-20261123-070000 ({runs[0]}) #2",
    ]  # same folder names: the paths
    runs[1] = tmp_path / "b" / "copy"
    got = [r["run"] for r in model.compare_reports(runs)]
    assert got == [
        "quant-prune-distill-20261123-070000 (quant-prune-distill-20261123-070000)",
        "quant-prune-distill-20261123-070000 (copy)",
    ]


def test_plot_labels_never_overlap_when_points_crowd():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dsk_compress.report.html import spread_labels

    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = [("ptq-dynamic", 10.0, 70.0), ("student-prune", 10.4, 70.02), ("student-distill", 10.2, 69.99), ("final", 30, 60)]
    labels = [ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8) for n, x, y in pts]
    ax.set_xlim(5, 50)
    ax.set_ylim(55, 75)
    boxes = spread_labels(fig, labels)
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
