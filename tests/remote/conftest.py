"""Fixtures for the remote tests: a loopback OpenSSH server, the emulated aarch64 board, a tiny real bundle.

Use them from a test module in tests/remote (``pytestmark = pytest.mark.remote``)::

    def test_x(emulated_device, tiny_bundle, tmp_path):
        with emulated_device.remote() as dev:                  # a Remote to the board, host key trusted
            out = dev.run_bundle(tiny_bundle, out_dir=tmp_path, **emulated_device.bundle_kwargs())
        # or drive the CLI: --host emulated_device.host --identity emulated_device.identity
        #   --known-hosts emulated_device.known_hosts --python emulated_device.python
        #   --wheelhouse emulated_device.wheelhouse (remote folders under emulated_device.root)

``ssh_server`` alone (no board: the device's Python is the host's ``python3``) is enough for tests of
the SSH layer itself. A fixture skips, naming the package to install, only when a tool is missing
here; ``.ci/run`` installs them all, so CI skips nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from . import board as board_mod
from . import sshd

APT_PACKAGE = {
    "qemu-aarch64-static": "qemu-user-static",
    "/usr/sbin/sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ssh-keyscan": "openssh-client",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
}


def _skip_missing(what: str, missing: list[str]) -> None:
    if missing:
        pkgs = sorted({APT_PACKAGE.get(t, t.split(" ")[-1].strip("()")) for t in missing})
        pytest.skip(f"{what} needs {', '.join(missing)} (Debian: apt-get install {' '.join(pkgs)}; .ci/run installs them)")


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory):
    """A running sshd on 127.0.0.1 (session-wide); connect as ``ssh_server.user`` with ``ssh_server.client_key``."""
    _skip_missing("the SSH test server", sshd.missing_tools())
    srv = sshd.SshServer(tmp_path_factory.mktemp("sshd")).start()
    yield srv
    srv.stop()


@pytest.fixture
def known_hosts(ssh_server, tmp_path) -> Path:
    """A known_hosts file that already trusts the test server."""
    p = tmp_path / "known_hosts"
    p.write_text(ssh_server.host_key_line)
    return p


@pytest.fixture(scope="session")
def aarch64_board() -> board_mod.Board:
    """The cached emulated aarch64 board (built on first use: about 30 s and 170 MB with a warm network)."""
    _skip_missing("the emulated aarch64 board", board_mod.missing_tools())
    return board_mod.board(log=lambda msg: print(msg, flush=True))


@dataclass(frozen=True)
class EmulatedDevice:
    """Everything a test needs to treat the board behind the test sshd as a device."""

    host: str  # user@127.0.0.1:port
    identity: Path
    known_hosts: Path
    python: str  # the board's python3 (arm64 under QEMU)
    wheelhouse: Path  # aarch64 wheels for an offline venv
    root: Path  # the device's working folder (bundles/, venvs/ beneath it)

    def remote(self, **kw):
        """A :class:`~dsk_compress.runtimes.remote.Remote` to the board; ``kw`` overrides its arguments."""
        from dsk_compress.runtimes.remote import Remote

        args = {"identity": self.identity, "known_hosts": self.known_hosts, "python": self.python, **kw}
        return Remote(self.host, **args)

    def bundle_kwargs(self) -> dict:
        """``run_bundle`` arguments that keep everything under ``root`` and install from the wheelhouse."""
        return {"wheelhouse": self.wheelhouse, "venvs_root": str(self.root / "venvs")}


@pytest.fixture(scope="session")
def emulated_device(ssh_server, aarch64_board, tmp_path_factory) -> EmulatedDevice:
    """The emulated aarch64 board reached over SSH (session-wide: one venv build per session)."""
    d = tmp_path_factory.mktemp("device")
    kh = d / "known_hosts"
    kh.write_text(ssh_server.host_key_line)
    return EmulatedDevice(ssh_server.host, ssh_server.client_key, kh, str(aarch64_board.python), aarch64_board.wheelhouse, d)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real rpi4 deploy bundle (fp32) of a tiny finished run: distill 2 steps, export, bench (about 30 s)."""
    from conftest import tiny_llama_recipe

    from dsk_compress import run_recipe
    from dsk_compress.export.bundle import make_bundle

    d = tmp_path_factory.mktemp("tiny-run")
    recipe = tiny_llama_recipe(
        d,
        "tiny-remote",
        [
            {"stage": "distill", "steps": 2, "batch_size": 4, "lr": 3e-3},
            {"stage": "export", "precisions": ["fp32"], "ptq_baselines": False, "kv_cache": False},
            {"stage": "bench", "runs": 3, "warmup": 1},
        ],
    )
    run = run_recipe(str(recipe), out=d / "runs")
    return make_bundle(run, "rpi4", d / "bundle-rpi4")
