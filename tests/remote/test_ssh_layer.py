"""The SSH layer (runtimes/remote.py) against a real OpenSSH server on 127.0.0.1, the device's Python being this one.

Host validation, host-key policy, authentication and connection errors, literal argument passing,
timeouts, incremental copies and the venv lifecycle; the emulated aarch64 board is in test_board.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dsk_compress.errors import DeviceError, DskError
from dsk_compress.runtimes.remote import (
    AuthError,
    ConnectError,
    Host,
    HostKeyError,
    Remote,
    RemoteCommandError,
    RemoteError,
    RemotePythonError,
    RemoteTimeout,
    VenvError,
    parse_host,
)

pytestmark = pytest.mark.remote

ECHO_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


@pytest.fixture
def remote(ssh_server, known_hosts):
    """A Remote to the test server whose Python is the one running the tests."""
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=known_hosts, python=sys.executable) as r:
        yield r


# --------------------------------------------------------------------------- host strings


@pytest.mark.parametrize(
    "text, host",
    [
        ("rpi5", Host("rpi5")),
        ("pi@rpi5.local", Host("rpi5.local", "pi")),
        ("pi@10.0.0.7:2222", Host("10.0.0.7", "pi", 2222)),
        ("jetson_1", Host("jetson_1")),
        ("root@[fe80::1%eth0]:22", Host("fe80::1%eth0", "root", 22)),
    ],
)
def test_parse_host_accepts_user_host_port(text, host):
    assert parse_host(text) == host
    assert str(parse_host(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "-oProxyCommand=touch /tmp/pwned",
        "-oProxyCommand=sh",
        "-p2222",
        "pi@-oProxyCommand=sh",
        "pi@host -oProxyCommand=sh",
        "pi@ho st",
        "pi@host\nid",
        "pi@host\r",
        "pi@host\t",
        "pi@host\x00",
        "pi@host;id",
        "pi@$(id)",
        "$(id)@host",
        "pi@`id`",
        "pi@host:0",
        "pi@host:65536",
        "pi@host:22:1",
        "pi@@host",
        "",
        "pi@",
        "pi@host:",
        "'pi@host'",
    ],
)
def test_parse_host_rejects_options_spaces_and_control_characters(text):
    with pytest.raises(RemoteError, match="not a valid SSH host") as ei:
        parse_host(text)
    assert isinstance(ei.value, DskError) and "user@host" in ei.value.hint
    assert "\n" not in str(ei.value)  # one line, control characters shown escaped


def test_remote_refuses_an_injected_host_before_running_ssh(tmp_path):
    canary = tmp_path / "pwned"
    with pytest.raises(RemoteError):
        Remote(f"-oProxyCommand=touch {canary}")
    assert not canary.exists()


def test_remote_commands_are_argument_lists_never_shell_strings(remote):
    with pytest.raises(TypeError, match="lists of str"):
        remote.run("echo hi")


# --------------------------------------------------------------------------- host keys, auth, reachability


def test_unknown_host_key_is_refused_without_the_flag_and_accepted_with_it(ssh_server, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=kh) as r:
        with pytest.raises(HostKeyError, match="not in known_hosts") as ei:
            r.run(["true"])
    assert "--accept-new-host-key" in ei.value.hint and f"ssh-keyscan -p {ssh_server.port} 127.0.0.1" in ei.value.hint
    assert kh.read_text() == ""  # nothing was recorded
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=kh, accept_new_host_key=True) as r:
        assert r.run(["echo", "ok"]).stdout == "ok\n"
    pub = ssh_server.host_key.with_suffix(".pub").read_text().split()[1]
    assert pub in kh.read_text()  # recorded: later connections verify against it, no flag needed
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=kh) as r:
        assert r.run(["echo", "again"]).stdout == "again\n"


def test_changed_host_key_is_refused_even_with_accept_new(ssh_server, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{ssh_server.port} " + " ".join(other.with_suffix(".pub").read_text().split()[:2]) + "\n")
    before = kh.read_text()
    for accept in (False, True):
        with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=kh, accept_new_host_key=accept) as r:
            with pytest.raises(HostKeyError, match="differs from the one in known_hosts") as ei:
                r.run(["true"])
        assert f"ssh-keygen -R '[127.0.0.1]:{ssh_server.port}' -f {kh}" in ei.value.hint  # the entry as known_hosts names it
    assert kh.read_text() == before


def test_unauthorized_key_is_an_auth_error_not_a_prompt(ssh_server, known_hosts, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with Remote(ssh_server.host, identity=stranger, known_hosts=known_hosts) as r:
        with pytest.raises(AuthError, match="refused our SSH keys") as ei:
            r.run(["true"], timeout=60)
    assert "--identity" in ei.value.hint and isinstance(ei.value, DeviceError)


def test_closed_port_is_a_connect_error(ssh_server, known_hosts):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Remote(f"{ssh_server.user}@127.0.0.1:{port}", identity=ssh_server.client_key, known_hosts=known_hosts, connect_timeout=5) as r:
        with pytest.raises(ConnectError, match="cannot reach .*Connection refused"):
            r.run(["true"])


# --------------------------------------------------------------------------- commands


def test_run_passes_every_argument_literally(remote, tmp_path):
    canary = tmp_path / "pwned"
    args = [
        "a b",
        "it's",
        '"double"',
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"; touch {canary}",
        "*",
        "~",
        "$HOME",
        "back\\slash",
        "line1\nline2",
        "tab\there",
        "",
        "-n",
        "--",
        "ünïcödé",
        "&&",
        "|",
        ">x",
        "!",
    ]
    out = remote.run([remote.python, "-c", ECHO_ARGV, *args])
    assert json.loads(out.stdout) == args
    assert not canary.exists() and not (Path.home() / ">x").exists()


def test_run_reports_exit_status_and_stderr(remote):
    with pytest.raises(RemoteCommandError, match=r"failed on .* \(exit 3\): boom") as ei:
        remote.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert ei.value.returncode == 3
    r = remote.run(["sh", "-c", "echo out; exit 4"], check=False)
    assert (r.returncode, r.stdout) == (4, "out\n")


def test_run_timeout_keeps_partial_output(remote):
    with pytest.raises(RemoteTimeout, match="did not finish within 2 s") as ei:
        remote.run(["sh", "-c", "echo started; sleep 30"], timeout=2)
    assert "started" in ei.value.stdout


def test_missing_remote_python_is_named_with_a_hint(ssh_server, known_hosts):
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=known_hosts, python="/nonexistent/python3") as r:
        with pytest.raises(RemotePythonError, match="no Python `/nonexistent/python3`") as ei:
            r.probe()
    assert "apt install python3" in ei.value.hint


def test_probe_describes_a_native_device(remote):
    import platform

    p = remote.probe()
    assert p.python_machine == p.uname_machine == platform.machine() and not p.emulated
    assert p.python_version == platform.python_version() and p.home.startswith("/")


# --------------------------------------------------------------------------- files


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_put_sends_only_what_changed_and_completes_a_partial_copy(remote, tmp_path):
    src = tmp_path / "bundle"
    (src / "sub dir").mkdir(parents=True)
    (src / "model.onnx").write_bytes(bytes(range(256)) * 4000)
    (src / "run.py").write_text("print('hi')\n")
    (src / "sub dir" / "it's here.txt").write_text("x")
    dest = tmp_path / "device" / "bundles" / "b 1"
    first = remote.put(src, str(dest))
    assert sorted(first.sent) == sorted(_tree(src)) and first.skipped == [] and first.bytes_sent == 1_024_013
    assert _tree(dest) == _tree(src)
    again = remote.put(src, str(dest))
    assert again.sent == [] and sorted(again.skipped) == sorted(_tree(src)) and again.bytes_sent == 0
    (src / "run.py").write_text("print('ho')\n")  # same size, new content
    with open(dest / "model.onnx", "r+b") as f:  # an interrupted earlier copy
        f.truncate(1000)
    third = remote.put(src, str(dest))
    assert sorted(third.sent) == ["model.onnx", "run.py"]
    assert _tree(dest) == _tree(src)


def test_get_fetches_a_file_and_leaves_nothing_on_failure(remote, tmp_path):
    src = tmp_path / "results.json"
    src.write_text('{"accuracy": 1.0}')
    got = remote.get(str(src), tmp_path / "local" / "r.json")
    assert got.read_text() == src.read_text()
    with pytest.raises(RemoteCommandError, match="No such file"):
        remote.get(str(tmp_path / "missing.json"), tmp_path / "local" / "m.json")
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["r.json"]


def test_tilde_paths_are_relative_to_the_login_home(remote):
    assert remote.path("~/dsk-compress/x") == remote.probe().home.rstrip("/") + "/dsk-compress/x"
    assert remote.path("/abs/~/x") == "/abs/~/x"


# --------------------------------------------------------------------------- venvs (native Python: fast)


def _tiny_wheel(folder: Path, name: str = "dsk_probe", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (module ``dsk_probe`` with ``VERSION``), made here: no index needed."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in {**files, f"{dist}/RECORD": record}.items():
            z.writestr(k, v)
    return path


def test_ensure_venv_creates_reuses_rebuilds_and_repairs(remote, tmp_path):
    wheels = tmp_path / "wheels"
    _tiny_wheel(wheels)
    req = tmp_path / "requirements.txt"
    req.write_text("dsk-probe==1.0\n")
    root = str(tmp_path / "device" / "venvs")
    a = remote.ensure_venv(req, root=root, wheelhouse=wheels)
    assert a.created and a.packages["dsk_probe"] == "1.0" and a.path == f"{root}/{a.key}"
    assert remote.run([a.python, "-c", "import dsk_probe, sys; print(dsk_probe.VERSION, sys.prefix)"]).stdout.split() == ["1.0", a.path]
    b = remote.ensure_venv(req, root=root, wheelhouse=wheels)
    assert not b.created and (b.path, b.packages) == (a.path, a.packages)
    req.write_text("dsk-probe==1.0\n# changed\n")  # a changed requirements file gets its own venv
    c = remote.ensure_venv(req, root=root, wheelhouse=wheels)
    assert c.created and c.key != a.key
    Path(c.path, "dsk-venv.json").unlink()  # as if the install had been interrupted
    d = remote.ensure_venv(req, root=root, wheelhouse=wheels)
    assert d.created and d.path == c.path and Path(d.path, "dsk-venv.json").is_file()


def test_ensure_venv_reports_a_missing_requirement_with_the_pip_tail(remote, tmp_path):
    _tiny_wheel(tmp_path / "wheels")
    req = tmp_path / "requirements.txt"
    req.write_text("dsk-probe==2.0\n")
    with pytest.raises(VenvError, match=r"pip install -r requirements.txt failed .*dsk-probe==2.0") as ei:
        remote.ensure_venv(req, root=str(tmp_path / "venvs"), wheelhouse=tmp_path / "wheels")
    assert "wheelhouse needs wheels" in ei.value.hint


def test_ensure_venv_names_the_apt_package_when_venv_is_missing(ssh_server, known_hosts, tmp_path):
    # Debian's python3 without python3-venv, reduced to what matters: `-m venv` fails with its message
    fake = tmp_path / "python3"
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = venv ]; then\n'
        '  echo "The virtual environment was not created successfully because ensurepip is not available." >&2; exit 1\n'
        f'fi\nexec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    req = tmp_path / "requirements.txt"
    req.write_text("numpy\n")
    with Remote(ssh_server.host, identity=ssh_server.client_key, known_hosts=known_hosts, python=str(fake)) as r:
        with pytest.raises(VenvError, match="-m venv` is not available") as ei:
            r.ensure_venv(req, root=str(tmp_path / "venvs"))
    assert "sudo apt install python3-venv (or python3.11-venv)" in ei.value.hint


# --------------------------------------------------------------------------- run_bundle mechanics (a stand-in bundle)

STUB_RUN_PY = """import argparse, json, platform, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("--out")
ap.add_argument("--fail", action="store_true")
ap.add_argument("--sleep", type=float, default=0)
a = ap.parse_args()
import dsk_probe  # installed from the bundle's requirements
print("started", flush=True)
time.sleep(a.sleep)
if a.fail:
    sys.exit("model.onnx is corrupt")
json.dump({"machine": platform.machine(), "probe": dsk_probe.VERSION}, open(a.out, "w"))
"""


@pytest.fixture
def stub_bundle(tmp_path):
    b = tmp_path / "stub"
    b.mkdir()
    (b / "run.py").write_text(STUB_RUN_PY)
    (b / "model_card.json").write_text("{}")
    (b / "requirements.txt").write_text("dsk-probe==1.0\n")
    _tiny_wheel(tmp_path / "wheels")
    return b


def test_run_bundle_labels_a_native_device_measured_keeps_logs_and_never_returns_stale_results(remote, stub_bundle, tmp_path):
    import platform

    kw = {
        "remote_root": str(tmp_path / "device" / "stub"),
        "venvs_root": str(tmp_path / "device" / "venvs"),
        "wheelhouse": tmp_path / "wheels",
    }
    ok = remote.run_bundle(stub_bundle, out_dir=tmp_path / "ok", **kw)
    assert ok["results"] == {"machine": platform.machine(), "probe": "1.0"}
    prov = ok["provenance"]
    assert prov["measurement"] == "measured" and prov["emulated"] is False and prov["venv_created"]
    assert prov["host"] == str(remote.host) and prov["packages"]["dsk_probe"] == "1.0"
    with pytest.raises(RemoteCommandError, match="run.py failed on .* \\(exit 1\\): model.onnx is corrupt") as ei:
        remote.run_bundle(stub_bundle, out_dir=tmp_path / "bad", run_args=["--fail"], **kw)
    assert str(tmp_path / "bad" / "run.log") in ei.value.hint
    assert "started" in (tmp_path / "bad" / "run.log").read_text() and not (tmp_path / "bad" / "results.json").exists()
    assert json.loads((tmp_path / "bad" / "provenance.json").read_text())["returncode"] == 1
    with pytest.raises(RemoteTimeout, match="did not finish within 2 s"):
        remote.run_bundle(stub_bundle, out_dir=tmp_path / "slow", run_args=["--sleep", "60"], timeout=2, **kw)
    assert "started" in (tmp_path / "slow" / "run.log").read_text()


def test_run_bundle_refuses_a_folder_that_is_not_a_bundle(remote, tmp_path):
    with pytest.raises(RemoteError, match="is not a deploy bundle \\(no run.py, model_card.json, requirements.txt\\)"):
        remote.run_bundle(tmp_path, out_dir=tmp_path / "out")
