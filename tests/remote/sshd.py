"""A real OpenSSH server on 127.0.0.1 for the remote tests (the recipe measured in ../shared/STACK.md).

Keys and config live in a temp folder; the server runs ``sshd -D -e`` (foreground, log on stderr) on a free
port, allows key authentication only, and lets the current user in (root too: ``prohibit-password``).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
TOOLS = ("ssh", "ssh-keygen", "ssh-keyscan")


def missing_tools() -> list[str]:
    """What this machine lacks to run the server and a client (empty when nothing is missing)."""
    return [t for t in (SSHD, *TOOLS) if shutil.which(t) is None]


class SshServer:
    """``start()`` it, connect as ``user`` with ``client_key``; ``host_key_line`` is its known_hosts entry."""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir)
        self.user = getpass.getuser()
        self.port = 0
        self.client_key = self.dir / "client_ed25519"
        self.host_key = self.dir / "host_ed25519"
        self.log = self.dir / "sshd.log"
        self._proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        """``user@127.0.0.1:port``, as a user would pass it to ``--host``."""
        return f"{self.user}@127.0.0.1:{self.port}"

    @property
    def host_key_line(self) -> str:
        """The server's key as a known_hosts line."""
        return f"[127.0.0.1]:{self.port} " + " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2]) + "\n"

    def start(self, timeout: float = 20) -> SshServer:
        """Generate the keys and config, start sshd on a free port and wait until it listens."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dsk-test", "-f", str(key)], check=True)
        shutil.copy(self.client_key.with_suffix(".pub"), self.dir / "authorized_keys")
        config = self.dir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"HostKey {self.host_key}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",  # keys under /tmp; no PAM: the test user needs no password
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "MaxStartups 50",
                    "MaxSessions 50",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:  # privilege separation needs its empty directory
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        with socket.socket() as s:  # a free port; sshd binds it right after, a race we accept in tests
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._log_file = open(self.log, "wb")
        self._proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config), "-p", str(self.port), "-o", "ListenAddress=127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while b"Server listening" not in self.log.read_bytes():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the server (its sessions end with it)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None:
            self._log_file.close()
        self._proc = None
