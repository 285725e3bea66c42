"""Run a deploy bundle on another machine over SSH: copy it, make its venv, run ``run.py``, fetch the results.

Why the OpenSSH client, driven through argument lists, rather than paramiko or asyncssh: the people who
run this already have SSH set up for their boards, and the ``ssh`` binary is what that setup was made
for. It reads ``~/.ssh/config`` in full (``Host`` aliases, ``Match``, ``Include``, ``ProxyJump``, per-host
``IdentityFile`` and ``User``), talks to ssh-agent, hardware and FIDO keys and certificates, and checks
``known_hosts`` including hashed entries and ``@cert-authority`` lines. The libraries each support part of
that (paramiko has no ProxyJump and parses only some of the config) and would add a dependency;
``ssh`` is on every Linux, macOS and Windows 10+ machine. Connection multiplexing (``ControlMaster``)
makes the many short commands below share one connection.

Safety rules kept here:

- No local shell: every process is started from an argument list. The command line the remote login
  shell parses is ``shlex.join`` of the arguments, so each one arrives literally (spaces, quotes,
  ``$()`` included). The only shell text is constant (``_PROBE_SH``, ``_UNTAR_SH``, ``_WRITE_SH``), and
  values reach it as positional parameters. The remote login shell must be POSIX (sh, bash, dash, zsh).
- :func:`parse_host` accepts only ``[user@]host[:port]`` made of hostname characters, so a host can never
  become an ssh option (``-oProxyCommand=...``); ``--`` ends ssh's options as a second guard.
- Host keys are always checked against known_hosts (``StrictHostKeyChecking=yes``); a new key is accepted
  only with ``accept_new_host_key=True`` (``accept-new``: a changed key is still refused). ``BatchMode``
  means ssh never prompts: key authentication (agent, config or ``identity``) or a clear error.
- Timeouts: ``ConnectTimeout`` and keep-alives for the connection, a deadline for every command, and
  GNU ``timeout`` around ``run.py`` on the device when it has one, so a stuck run does not outlive us.
- Re-runs are cheap and safe: :meth:`Remote.put` sends only files whose size or SHA-256 differ; a venv is
  reused when its requirements, the device's Python and the wheelhouse are unchanged, and one left
  half-made by an interrupted install is rebuilt; ``run.log`` is kept locally even when a run fails.

A board emulated with QEMU user mode (an arm64 Python on an x86 host, as the tests use) is detected
(the kernel's ``uname -m`` and the Python-reported machine belong to different CPU families) and its
results are labelled ``emulated``, never ``measured``.

Example::

    with Remote(parse_host("pi@rpi5.local"), accept_new_host_key=True) as dev:
        out = dev.run_bundle("runs/x/bundles/rpi5", out_dir="runs/x/device/rpi5", wheelhouse="wheels/")
    out["results"]["accuracy"], out["provenance"]["measurement"]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from dsk_compress.errors import DeviceError

DEFAULT_BUNDLES_ROOT = "~/dsk-compress/bundles"
DEFAULT_VENVS_ROOT = "~/dsk-compress/venvs"
PID_FILE = ".run.pid"  # the running run.py's PID, beside it on the device
VENV_MARKER = "dsk-venv.json"  # written last: a venv without it is unfinished and gets rebuilt
TAIL_LINES = 15

_USER = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_HOSTNAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_IPV6 = r"\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]"
_HOST_RE = re.compile(rf"(?:(?P<user>{_USER})@)?(?P<host>{_HOSTNAME}|{_IPV6})(?::(?P<port>[0-9]{{1,5}}))?")

# Native facts first (no Python needed), then the device's Python: one round trip. $1 = python, $2 = _PROBE_PY.
# The marker line skips anything a login script may print before.
_PROBE_MARK = "--dsk-probe--"
_PROBE_SH = f'echo {_PROBE_MARK}; uname -m; uname -sr; pwd; command -v timeout || echo; exec "$1" -c "$2"'
_PROBE_PY = r"""
import json, os, platform, sys
def read(path):
    try:
        return open(path, errors="replace").read().replace("\x00", "").strip()
    except OSError:
        return ""
info = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in read("/proc/cpuinfo").splitlines() if ":" in l)}
cpu = read("/proc/device-tree/model") or info.get("model name") or info.get("Model") or info.get("Hardware")
if not cpu and "CPU part" in info:  # arm64 kernels name no model: implementer and part numbers say which core
    cpu = "ARM implementer %s part %s" % (info.get("CPU implementer", "?"), info["CPU part"])
print(json.dumps({"machine": platform.machine(), "version": platform.python_version(), "major_minor": list(sys.version_info[:2]),
                  "implementation": platform.python_implementation(), "cpu": cpu, "cpu_count": os.cpu_count()}))
"""
_UNTAR_SH = 'mkdir -p -- "$1" && exec tar -x -o -f - -C "$1"'  # -o: files belong to the login user
# Starts a command with its PID in a file ($1), so an interrupted bench can stop it (exec: the PID stays the command's; GNU
# timeout, when it is the command, leads its own process group, so the group holds run.py and all it started).
_RUN_SH = 'echo $$ > "$1" && shift && exec "$@"'
# Stops what _RUN_SH started ($1: the PID file) when it is still a run.py: its process group, then the process; prints
# "PID ARGS" of what it stopped (nothing when nothing ran) and removes the PID file.
_STOP_SH = r"""f=$1; [ -f "$f" ] || exit 0
pid=$(cat -- "$f" 2>/dev/null); rm -f -- "$f"
case $pid in ''|*[!0-9]*) exit 0;; esac
what=$(ps -o args= -p "$pid" 2>/dev/null) || exit 0
case $what in *run.py*) ;; *) exit 0;; esac
echo "$pid $what"
kill -TERM -"$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null
i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
kill -KILL -"$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null; exit 0"""
# Free bytes of the filesystem that holds $1 (its nearest existing folder): df -P's available 1K-blocks.
_FREE_SH = r"""d=$1; while [ ! -d "$d" ]; do d=$(dirname -- "$d"); done; df -Pk -- "$d" | awk 'NR==2 {print $4 * 1024}'"""
# Lists "KBYTES<TAB>PATH" of each entry of the folders given (du -sk), for --clean.
_SIZES_SH = (
    r"""for d in "$@"; do [ -d "$d" ] || continue; for e in "$d"/* "$d"/.[!.]*; do [ -e "$e" ] && du -sk -- "$e"; done; done; exit 0"""
)
_NO_SPACE = re.compile(r"No space left on device|Errno 28|ENOSPC|Disk quota exceeded")
_NO_PERMISSION = re.compile(r"Permission denied|Errno 13|Read-only file system|Operation not permitted")
_WRITE_SH = 'mkdir -p -- "$(dirname -- "$1")" && exec cat > "$1"'
# Reads {relative path: size} on stdin; prints the SHA-256 of each file that exists with that size.
_HASH_PY = r"""
import hashlib, json, os, sys
root, want, out = sys.argv[1], json.load(sys.stdin), {}
for rel, size in want.items():
    p = os.path.join(root, rel)
    try:
        if os.path.isfile(p) and os.path.getsize(p) == size:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for b in iter(lambda: f.read(1 << 20), b""):
                    h.update(b)
            out[rel] = h.hexdigest()
    except OSError:
        pass
print(json.dumps(out))
"""
# Checks the venv's interpreter runs and prints its marker (or nothing): one round trip.
_READ_MARKER_PY = "import sys\ntry:\n    print(open(sys.argv[1]).read())\nexcept OSError:\n    pass\n"
# Lists the venv's installed distributions and writes the marker: the last step of a venv build.
_WRITE_MARKER_PY = r"""
import json, sys
from importlib import metadata
info = json.load(sys.stdin)
info["packages"] = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
print(json.dumps(info))
"""


class RemoteError(DeviceError):
    """Something failed on or on the way to a remote device."""


class HostKeyError(RemoteError):
    """The device's host key is unknown, or differs from the one in known_hosts."""


class AuthError(RemoteError):
    """The device refused our keys."""


class ConnectError(RemoteError):
    """The device could not be reached (name, route, refused connection, connect timeout)."""


class RemoteTimeout(RemoteError):
    """A remote command did not finish in time. ``stdout``/``stderr`` hold what it printed."""

    def __init__(self, message: str, hint: str | None = None, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message, hint)
        self.stdout, self.stderr = stdout, stderr


class RemoteCommandError(RemoteError):
    """A remote command exited non-zero. ``returncode``/``stderr`` say how."""

    def __init__(self, message: str, hint: str | None = None, returncode: int = 1, stderr: str = "") -> None:
        super().__init__(message, hint)
        self.returncode, self.stderr = returncode, stderr


class RemotePythonError(RemoteError):
    """The device has no usable Python."""


class VenvError(RemoteError):
    """The device's virtual environment could not be created or installed."""


class DiskFullError(RemoteError):
    """The device's disk filled up (or its quota): the message names the free space and the space needed."""


class RemotePermissionError(RemoteError):
    """The login user may not write where the bench puts its files on the device."""


class RemoteInterrupted(KeyboardInterrupt):
    """Ctrl-C during a remote run: what was running on the device has been stopped. ``stopped`` lists it ("PID ARGS")."""

    def __init__(self, host: str, stopped: list[str], partial: dict | None = None) -> None:
        self.stopped, self.partial = stopped, partial
        what = "; ".join(stopped) if stopped else "nothing was running there any more"
        self.message = f"interrupted: stopped on {host}: {what}"
        super().__init__(self.message)


@dataclass(frozen=True)
class Host:
    """A validated SSH destination. ``hostname`` may be an alias from ``~/.ssh/config``."""

    hostname: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return (f"{self.user}@" if self.user else "") + host + (f":{self.port}" if self.port else "")


def parse_host(text: str) -> Host:
    """Parse and validate ``[user@]host[:port]`` (IPv6 as ``[addr]``); anything else raises RemoteError.

    Only hostname characters are accepted, so an argument such as ``-oProxyCommand=...`` or one with
    spaces, quotes or control characters can never reach ssh as an option or a second argument.
    """
    m = _HOST_RE.fullmatch(text) if isinstance(text, str) else None
    port = int(m["port"]) if m and m["port"] else None
    if m is None or text.startswith("-") or (port is not None and not 0 < port < 65536):
        shown = text.encode("unicode_escape").decode() if isinstance(text, str) else repr(text)
        raise RemoteError(
            f"not a valid SSH host: {shown!r}", hint="use user@host or user@host:port (letters, digits, '.', '-', '_'; IPv6 as [addr])"
        )
    return Host(m["host"].strip("[]"), m["user"], port)


@dataclass(frozen=True)
class Probe:
    """What a device is: its kernel's machine, its Python, and whether that Python is emulated."""

    uname_machine: str
    python_machine: str
    python_version: str
    python_implementation: str
    os: str
    home: str
    cpu: str | None
    cpu_count: int | None
    has_timeout: bool

    @property
    def emulated(self) -> bool:
        """True when Python runs under emulation (e.g. arm64 Python under qemu-user on an x86 kernel)."""
        from dsk_compress.runtimes.measure import machine_family

        return machine_family(self.uname_machine) != machine_family(self.python_machine)


@dataclass(frozen=True)
class Venv:
    """A ready virtual environment on the device."""

    path: str
    python: str
    key: str
    created: bool
    packages: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Transfer:
    """What :meth:`Remote.put` did: relative paths sent and skipped (already identical), bytes sent."""

    sent: list[str]
    skipped: list[str]
    bytes_sent: int


class Remote:
    """One SSH destination, reached with the OpenSSH client; use as a context manager (or call close()).

    Args:
        host: a :class:`Host` or a ``[user@]host[:port]`` string (validated with :func:`parse_host`).
        identity: private key file (``ssh -i``, and only that key is offered); None: agent / ssh config.
        known_hosts: known_hosts file to check and record host keys in; None: ssh's default files.
        accept_new_host_key: trust a host key seen for the first time (``StrictHostKeyChecking=accept-new``);
            a key that differs from the recorded one is refused either way.
        connect_timeout: seconds for TCP connect + SSH handshake.
        command_timeout: default deadline in seconds of each remote command.
        python: the device's Python (command name on its PATH or absolute path).
        ssh_config: an ssh_config file to use instead of ``~/.ssh/config`` (``ssh -F``).
    """

    def __init__(
        self,
        host: Host | str,
        *,
        identity: str | Path | None = None,
        known_hosts: str | Path | None = None,
        accept_new_host_key: bool = False,
        connect_timeout: float = 10,
        command_timeout: float = 600,
        python: str = "python3",
        ssh_config: str | Path | None = None,
    ) -> None:
        self.host = host if isinstance(host, Host) else parse_host(host)
        self.python = python
        self.command_timeout = command_timeout
        self.known_hosts = None if known_hosts is None else str(known_hosts)
        self._probe: Probe | None = None
        if shutil.which("ssh") is None:
            raise RemoteError(
                "the OpenSSH client (ssh) is not installed here", hint="install it (Debian/Ubuntu: sudo apt install openssh-client)"
            )
        self._control_dir = tempfile.mkdtemp(prefix="dsk-ssh-")  # short path: unix sockets are limited to ~100 bytes
        opts = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "accept-new" if accept_new_host_key else "yes",
            "ConnectTimeout": str(max(1, round(connect_timeout))),
            "ServerAliveInterval": "15",
            "ServerAliveCountMax": "3",
            "LogLevel": "ERROR",
            "ControlMaster": "auto",
            "ControlPath": f"{self._control_dir}/%C",
            "ControlPersist": "120",
        }
        if known_hosts is not None:
            opts["UserKnownHostsFile"] = _ssh_path(known_hosts)
            opts["GlobalKnownHostsFile"] = "none"
        if identity is not None:
            opts["IdentitiesOnly"] = "yes"
        args = ["ssh", "-T"]
        if ssh_config is not None:
            args += ["-F", str(ssh_config)]
        if identity is not None:
            args += ["-i", str(identity)]
        for k, v in opts.items():
            args += ["-o", f"{k}={v}"]
        if self.host.user:
            args += ["-l", self.host.user]
        if self.host.port:
            args += ["-p", str(self.host.port)]
        self._ssh = args
        self._finalizer = weakref.finalize(self, _stop_master, [*args, "-O", "exit", "--", self.host.hostname], self._control_dir)

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the shared connection (idempotent)."""
        self._finalizer()

    def ssh_argv(self, args: Sequence[str]) -> list[str]:
        """The local argv that runs ``args`` on the device (each argument quoted for the remote shell)."""
        if isinstance(args, (str, bytes)) or not all(isinstance(a, str) and "\0" not in a for a in args):
            raise TypeError("remote commands are lists of str arguments (no NUL bytes), never one shell string")
        return [*self._ssh, "--", self.host.hostname, shlex.join(args)]

    # ------------------------------------------------------------------ commands

    def run(
        self, args: Sequence[str], *, timeout: float | None = None, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one command (a list of arguments, passed literally) on the device and return its output.

        Raises HostKeyError, AuthError or ConnectError when ssh cannot get there, RemoteTimeout after
        ``timeout`` seconds (default ``command_timeout``), and with ``check`` RemoteCommandError on a
        non-zero exit status.
        """
        return self._exec(args, timeout=timeout, check=check, input=input, text=True)

    def _exec(
        self, args: Sequence[str], *, timeout: float | None, check: bool, input=None, text: bool = False, stdin=None, stdout=subprocess.PIPE
    ) -> subprocess.CompletedProcess:
        argv = self.ssh_argv(args)
        limit = self.command_timeout if timeout is None else timeout
        if input is None and stdin is None:
            stdin = subprocess.DEVNULL
        try:
            proc = subprocess.run(argv, input=input, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=text, timeout=limit)
        except subprocess.TimeoutExpired as e:
            out, err = (_text(s) for s in (e.stdout, e.stderr))
            raise self._timeout(args, limit, out, err) from None
        err = _text(proc.stderr)
        if proc.returncode == 255:
            self._raise_ssh_error(err)
        if check and proc.returncode != 0:
            raise RemoteCommandError(
                f"`{_short(args)}` failed on {self.host} (exit {proc.returncode}): {_last_line(err)}",
                returncode=proc.returncode,
                stderr=err,
            )
        return proc

    def _timeout(self, args: Sequence[str], limit: float, stdout: str, stderr: str) -> RemoteTimeout:
        return RemoteTimeout(
            f"`{_short(args)}` on {self.host} did not finish within {limit:g} s",
            hint="raise the timeout, or check the device is not overloaded",
            stdout=stdout,
            stderr=stderr,
        )

    def _exec_lines(self, args: Sequence[str], *, timeout: float, on_line) -> subprocess.CompletedProcess:
        """:meth:`_exec` (text, unchecked) that hands each line of the command's stdout to ``on_line`` as it arrives."""
        import queue
        import threading

        argv = self.ssh_argv(args)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        lines: queue.Queue = queue.Queue()
        err: list[str] = []

        def pump() -> None:
            for ln in proc.stdout:
                lines.put(ln)
            lines.put(None)

        readers = [threading.Thread(target=pump, daemon=True), threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)]
        for t in readers:
            t.start()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    raise self._timeout(args, timeout, "".join(out), "".join(err))
                try:
                    line = lines.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if line is None:
                    break
                out.append(line)
                on_line(line.rstrip("\n"))
            proc.wait()
        except BaseException:  # Ctrl-C or a timeout: the ssh client goes with it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        for t in readers:
            t.join(timeout=5)
        stderr = "".join(err)
        if proc.returncode == 255:
            self._raise_ssh_error(stderr)
        return subprocess.CompletedProcess(argv, proc.returncode, "".join(out), stderr)

    def _raise_ssh_error(self, err: str) -> None:
        """Turn ssh's own failures (exit 255) into one-line errors with a hint; other 255s are the command's."""
        h = self.host
        entry = f"[{h.hostname}]:{h.port}" if h.port and h.port != 22 else h.hostname  # how known_hosts names it
        kh = shlex.quote(self.known_hosts) if self.known_hosts else "~/.ssh/known_hosts"
        scan = f"ssh-keyscan {'-p ' + str(h.port) + ' ' if h.port else ''}{shlex.quote(h.hostname)} >> {kh}"
        remove = f"ssh-keygen -R {shlex.quote(entry)}" + (f" -f {kh}" if self.known_hosts else "")
        if re.search(r"HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed", err):
            raise HostKeyError(
                f"the host key of {h} differs from the one in known_hosts (refused: possible man-in-the-middle)",
                hint=f"if the device was reinstalled, check its fingerprint and remove the old key: {remove}",
            )
        if re.search(r"No \S+ host key is known|Host key verification failed", err):
            raise HostKeyError(
                f"the host key of {h} is not in known_hosts" + (f" ({self.known_hosts})" if self.known_hosts else ""),
                hint=f"check the device's fingerprint and add it ({scan}), or pass --accept-new-host-key to trust it on first use",
            )
        if "Permission denied" in err or "Too many authentication failures" in err:
            raise AuthError(
                f"{h} refused our SSH keys: {_last_line(err)}",
                hint="only key authentication is used: pass --identity KEY or load it into ssh-agent, "
                "and install its .pub on the device (ssh-copy-id)",
            )
        if re.search(
            r"Could not resolve|timed out|Connection refused|No route to host|Network is unreachable|"
            r"Connection closed|Connection reset|kex_exchange_identification|ssh: connect to host",
            err,
        ):
            raise ConnectError(
                f"cannot reach {h}: {_last_line(err)}", hint="check the address and port, that the device is on and sshd runs on it"
            )

    def probe(self) -> Probe:
        """Facts about the device (kernel and Python machine, Python version, CPU, home), fetched once."""
        if self._probe is None:
            r = self._exec(["sh", "-c", _PROBE_SH, "sh", self.python, _PROBE_PY], timeout=120, check=False, text=True)
            lines = r.stdout.splitlines()
            lines = lines[lines.index(_PROBE_MARK) + 1 :] if _PROBE_MARK in lines else []
            if r.returncode != 0 or len(lines) < 5:
                missing = r.returncode in (126, 127)
                raise RemotePythonError(
                    f"{'no' if missing else 'a broken'} Python `{self.python}` on {self.host}: {_last_line(r.stderr)}",
                    hint="install Python 3 on the device (Debian / Pi OS: sudo apt install python3 python3-venv), "
                    "or name another interpreter with --python",
                )
            info = json.loads(lines[4])
            if tuple(info["major_minor"]) < (3, 8):
                raise RemotePythonError(
                    f"{self.host} runs Python {info['version']}; bundles need 3.8 or later",
                    hint="install a newer python3 on the device or name one with --python",
                )
            self._probe = Probe(
                uname_machine=lines[0].strip(),
                python_machine=info["machine"],
                python_version=info["version"],
                python_implementation=info["implementation"],
                os=lines[1].strip(),
                home=lines[2].strip(),
                cpu=info["cpu"],
                cpu_count=info["cpu_count"],
                has_timeout=bool(lines[3].strip()),
            )
        return self._probe

    def path(self, remote: str | PurePosixPath) -> str:
        """A device path with a leading ``~`` replaced by the login user's home (nothing else expanded)."""
        s = str(remote)
        if s == "~" or s.startswith("~/"):
            return self.probe().home.rstrip("/") + s[1:]
        return s

    # ------------------------------------------------------------------ files

    def put(self, local_dir: str | Path, remote_dir: str, *, timeout: float | None = None) -> Transfer:
        """Copy a folder's files to ``remote_dir`` (created if needed), skipping those already identical.

        A file is skipped when the device holds one of the same size and SHA-256 at the same place, so a
        re-run sends nothing new and an interrupted copy is completed. Files only on the device stay.
        """
        local_dir, dest = Path(local_dir), self.path(remote_dir)
        if not local_dir.is_dir():
            raise RemoteError(f"not a folder: {local_dir}", hint="pass the bundle's directory")
        files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
        there = json.loads(
            self._exec(
                [self.python, "-c", _HASH_PY, dest],
                timeout=timeout,
                check=True,
                text=True,
                input=json.dumps({rel: p.stat().st_size for rel, p in files.items()}),
            ).stdout
        )
        send = [rel for rel, p in files.items() if there.get(rel) != _sha256(p)]
        if send:
            with tempfile.TemporaryFile() as buf:  # a file, not a pipe: ssh reads it at its own pace, no deadlock
                with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for rel in send:
                        tar.add(files[rel], arcname=rel, filter=_anonymous)
                buf.seek(0)
                r = self._exec(["sh", "-c", _UNTAR_SH, "sh", dest], timeout=timeout, check=False, stdin=buf)
            if r.returncode != 0:  # remove what this copy left half-written: a full disk stays full otherwise
                err = _text(r.stderr)
                self._remove_partial(dest, send, whole=not there)
                need = sum(files[rel].stat().st_size for rel in send)
                self.raise_storage_error(err, dest, need, f"copying {len(send)} file(s) to {dest}")
                raise RemoteCommandError(
                    f"copying files to {dest} on {self.host} failed (exit {r.returncode}): {_last_line(err)}",
                    returncode=r.returncode,
                    stderr=err,
                )
        return Transfer(sent=send, skipped=[r for r in files if r not in send], bytes_sent=sum(files[r].stat().st_size for r in send))

    def _remove_partial(self, dest: str, rels: Sequence[str], whole: bool) -> None:
        """Remove ``dest`` (``whole``: the copy made it) or the files of ``rels`` in it, ignoring failures."""
        if whole:
            self._exec(["rm", "-rf", "--", dest], timeout=300, check=False)
        elif rels:
            self._exec(["rm", "-f", "--", *(f"{dest}/{rel}" for rel in rels)], timeout=300, check=False)

    def free_bytes(self, path: str) -> int | None:
        """Free bytes on the device's filesystem holding ``path`` (or its nearest existing parent); None if unknown."""
        r = self._exec(["sh", "-c", _FREE_SH, "sh", self.path(path)], timeout=60, check=False, text=True)
        try:
            return int(r.stdout.split()[-1])
        except (IndexError, ValueError):
            return None

    def raise_storage_error(
        self, err: str, where: str, needed: int | None, doing: str, remove: Sequence[str] = (), by_free_space: bool = False
    ) -> None:
        """Raise DiskFullError (with the free space there and ``needed`` bytes) or RemotePermissionError when ``err`` says so.

        ``remove``: folders deleted first when the disk is full (what the failed step half-made), so the free space named is
        what the user has. ``by_free_space``: also call it a full disk when less than ``needed`` is free (a tool that hides
        the ENOSPC of a child, as ``python -m venv`` does for ensurepip)."""
        full = bool(_NO_SPACE.search(err))
        if not full and by_free_space and needed:
            free = self.free_bytes(where)
            full = free is not None and free < needed
        if full:
            if remove:
                self._exec(["rm", "-rf", "--", *remove], timeout=300, check=False)
            free = self.free_bytes(where)
            room = f"{_size(free)} free" if free is not None else "free space unknown"
            need = f", about {_size(needed)} needed" if needed else ""
            raise DiskFullError(
                f"the disk of {self.host} is full: {doing} stopped ({room} under {where}{need})",
                hint=f"free space on the device (dsk-compress bench --clean {self.host} removes what earlier benches "
                "left), or give a folder on a bigger disk with --remote-dir",
            )
        if _NO_PERMISSION.search(err):
            user = self.host.user or "the login user"
            raise RemotePermissionError(
                f"permission denied on {self.host}: {doing} ({_last_line(err)})",
                hint=f"give a folder {user} may write with --remote-dir (e.g. ~/dsk-compress), or make it theirs "
                f"(sudo chown -R {user} FOLDER)",
            )

    def get(self, remote_path: str, local_path: str | Path, *, timeout: float | None = None) -> Path:
        """Copy one file from the device to ``local_path`` (written atomically); returns the local path."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.part")
        try:
            with open(tmp, "wb") as f:
                self._exec(["cat", "--", self.path(remote_path)], timeout=timeout, check=True, stdout=f)
            tmp.replace(local_path)
        finally:
            tmp.unlink(missing_ok=True)
        return local_path

    def write(self, remote_path: str, data: str, *, timeout: float | None = None) -> None:
        """Write ``data`` to a file on the device (its folder created if needed)."""
        dest = self.path(remote_path)
        r = self._exec(["sh", "-c", _WRITE_SH, "sh", dest], timeout=timeout, check=False, input=data, text=True)
        if r.returncode != 0:
            self.raise_storage_error(r.stderr, dest, len(data.encode()), f"writing {dest}")
            raise RemoteCommandError(
                f"writing {dest} on {self.host} failed (exit {r.returncode}): {_last_line(r.stderr)}",
                returncode=r.returncode,
                stderr=r.stderr,
            )

    # ------------------------------------------------------------------ venv and bundles

    def ensure_venv(
        self, requirements: str | Path, *, root: str = DEFAULT_VENVS_ROOT, wheelhouse: str | Path | None = None, timeout: float = 1800
    ) -> Venv:
        """Create, or reuse, a virtual environment on the device with ``requirements`` installed.

        The venv lives in ``root/<key>``, the key hashing the requirements, the device's Python version
        and machine, and the wheelhouse's file names: a changed requirements file gets a new venv, an
        unchanged one is reused (a venv is needed on Pi OS Bookworm / Debian 12, whose system pip refuses
        to install: externally-managed-environment). With ``wheelhouse`` (a local folder of wheels for the
        device) they are copied to ``root/wheelhouse-<hash of their names>`` (pip sees exactly these wheels,
        and another venv from the same wheelhouse copies nothing) and installed offline (``--no-index``).
        """
        requirements = Path(requirements)
        if not requirements.is_file():
            raise VenvError(f"no requirements file at {requirements}", hint="a bundle ships requirements.txt beside run.py")
        reqs, p = requirements.read_text(), self.probe()
        wheels = sorted(w.name for w in Path(wheelhouse).glob("*.whl")) if wheelhouse is not None else None
        if wheelhouse is not None and not wheels:
            raise VenvError(
                f"no wheels in {wheelhouse}", hint="fill it with pip download --only-binary=:all: --platform ... -r requirements.txt"
            )
        key = hashlib.sha256(json.dumps([reqs, p.python_version, p.python_machine, wheels]).encode()).hexdigest()[:16]
        root = self.path(root).rstrip("/")
        vdir = f"{root}/{key}"
        vpy = f"{vdir}/bin/python"
        seen = self._exec([vpy, "-c", _READ_MARKER_PY, f"{vdir}/{VENV_MARKER}"], timeout=300, check=False, text=True)
        if seen.returncode == 0 and seen.stdout.strip():
            return Venv(vdir, vpy, key, created=False, packages=json.loads(seen.stdout).get("packages", {}))
        self.run(["rm", "-rf", "--", vdir], timeout=300)  # half-made by an interrupted build, or never made
        wbytes = sum(w.stat().st_size for w in Path(wheelhouse).glob("*.whl")) if wheelhouse is not None else 0
        needed = 25 * (1 << 20) + 3 * wbytes  # the venv with pip, and the installed wheels (about 3x their compressed size)
        wdir = f"{root}/wheelhouse-{hashlib.sha256(json.dumps(wheels).encode()).hexdigest()[:12]}" if wheelhouse is not None else None
        try:
            made = self._exec([self.python, "-m", "venv", vdir], timeout=timeout, check=False, text=True)
            if made.returncode != 0:
                out = made.stderr + made.stdout
                self._exec(["rm", "-rf", "--", vdir], timeout=300, check=False)
                self.raise_storage_error(
                    out, vdir, needed, f"creating the venv {vdir}", remove=[d for d in (wdir,) if d], by_free_space=True
                )
                if re.search(r"ensurepip is not available|No module named venv", out):
                    mm = ".".join(p.python_version.split(".")[:2])
                    raise VenvError(
                        f"`{self.python} -m venv` is not available on {self.host} (python3-venv is not installed)",
                        hint=f"install it on the device: sudo apt install python3-venv (or python{mm}-venv)",
                    )
                raise VenvError(f"creating a venv on {self.host} failed: {_tail(made.stderr or made.stdout)}")
            self.write(f"{vdir}/requirements.txt", reqs)
            pip = [vpy, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r", f"{vdir}/requirements.txt"]
            if wdir is not None:
                self.put(wheelhouse, wdir, timeout=timeout)
                pip += ["--no-index", "--find-links", wdir]
            inst = self._exec(pip, timeout=timeout, check=False, text=True)
            if inst.returncode != 0:
                self._exec(["rm", "-rf", "--", vdir], timeout=300, check=False)
                self.raise_storage_error(
                    inst.stderr + inst.stdout,
                    vdir,
                    needed,
                    f"installing requirements.txt into {vdir}",
                    remove=[d for d in (wdir,) if d],
                    by_free_space=True,
                )
                hint = (
                    f"the wheelhouse needs wheels of every requirement for Python {p.python_version} on {p.python_machine} "
                    "(pip download --only-binary=:all: --platform ... --python-version ...)"
                    if wheelhouse is not None
                    else "check the device's internet access, or pass --wheelhouse DIR to install offline"
                )
                raise VenvError(f"pip install -r requirements.txt failed on {self.host}: {_tail(inst.stderr or inst.stdout)}", hint=hint)
        except BaseException as e:  # a failed or interrupted build leaves nothing behind (a full disk would stay full)
            gone = [vdir] + ([wdir] if wdir is not None and isinstance(e, DiskFullError) else [])
            try:
                self._exec(["rm", "-rf", "--", *gone], timeout=300, check=False)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        info = {
            "key": key,
            "python": p.python_version,
            "machine": p.python_machine,
            "requirements": reqs,
            "offline": wheels is not None,
            "created_at": _now(),
        }
        done = self._exec(
            [vpy, "-c", _WRITE_MARKER_PY, f"{vdir}/{VENV_MARKER}"], timeout=300, check=True, text=True, input=json.dumps(info)
        )
        return Venv(vdir, vpy, key, created=True, packages=json.loads(done.stdout)["packages"])

    def stop_run(self, remote_dir: str) -> list[str]:
        """Stop the run.py a bundle run started in ``remote_dir`` (its process group, by the PID file) if it still runs.

        Returns ``"PID ARGS"`` of what was stopped (empty: nothing ran). Safe to call any time; a PID that now belongs to
        another program is left alone."""
        pidfile = f"{self.path(remote_dir).rstrip('/')}/{PID_FILE}"
        r = self._exec(["sh", "-c", _STOP_SH, "sh", pidfile], timeout=60, check=False, text=True)
        return [line.strip() for line in r.stdout.splitlines() if line.strip()]

    def run_bundle(
        self,
        bundle_dir: str | Path,
        *,
        out_dir: str | Path,
        remote_root: str | None = None,
        run_args: Sequence[str] = (),
        wheelhouse: str | Path | None = None,
        venvs_root: str = DEFAULT_VENVS_ROOT,
        timeout: float = 1800,
        log=None,
    ) -> dict:
        """Run a deploy bundle on the device and bring back its results, labelled with where they were measured.

        Copies the bundle to ``remote_root`` (default ``~/dsk-compress/bundles/<bundle name>``), makes or
        reuses its venv (:meth:`ensure_venv`), runs ``run.py --out results.json *run_args`` with the venv's
        Python, and fetches ``results.json`` into ``out_dir``; ``run.log`` (run.py's output) and
        ``provenance.json`` are written there too, also when the run fails.

        Returns:
            ``{"results": <run.py's results.json>, "provenance": {...}, "transfer": {...}, "out_dir": str}``;
            provenance holds the host, ``uname_machine`` (the kernel), ``python_machine``, ``emulated`` and
            ``measurement`` (``"measured"`` or ``"emulated"``), the Python version, CPU, package versions
            of the venv, ``wall_s`` of run.py and when it finished.
        """
        bundle, out = Path(bundle_dir), Path(out_dir)
        missing = [f for f in ("run.py", "model_card.json", "requirements.txt") if not (bundle / f).is_file()]
        if missing:
            raise RemoteError(
                f"{bundle} is not a deploy bundle (no {', '.join(missing)})",
                hint="write one with: dsk-compress export RUN --device PROFILE",
            )
        remote_root, venvs_root = (
            confined(d, what)
            for d, what in (
                (remote_root or f"{DEFAULT_BUNDLES_ROOT}/{bundle.name}", "the bundle's folder"),
                (venvs_root, "the venvs folder"),
            )
        )
        p = self.probe()
        rdir = self.path(remote_root).rstrip("/")
        stale = self.stop_run(rdir)  # an earlier bench's run.py (its ssh killed, say) would compete with this one
        if stale and log is not None:
            log(f"stopped a run.py an earlier bench left running on {self.host}: {'; '.join(stale)}")
        transfer = self.put(bundle, rdir, timeout=timeout)
        venv = self.ensure_venv(bundle / "requirements.txt", root=venvs_root, wheelhouse=wheelhouse, timeout=timeout)
        self.run(["rm", "-f", "--", f"{rdir}/results.json"])  # never fetch a previous run's results
        argv = [venv.python, f"{rdir}/run.py", "--out", f"{rdir}/results.json", *run_args]
        if p.has_timeout:  # the device stops run.py itself: a killed ssh client may not
            argv = ["timeout", "-k", "10", str(int(timeout)), *argv]
        pidfile = f"{rdir}/{PID_FILE}"
        argv = ["sh", "-c", _RUN_SH, "sh", pidfile, *argv]  # its PID on the device: Ctrl-C here stops it there
        out.mkdir(parents=True, exist_ok=True)
        prov = {
            "host": str(self.host),
            "uname_machine": p.uname_machine,
            "python_machine": p.python_machine,
            "emulated": p.emulated,
            "measurement": "emulated" if p.emulated else "measured",
            "os": p.os,
            "cpu": p.cpu,
            "cpu_count": p.cpu_count,
            "python": p.python_version,
            "python_implementation": p.python_implementation,
            "remote_dir": rdir,
            "venv": venv.path,
            "venv_created": venv.created,
            "packages": venv.packages,
            "run_args": list(run_args),
        }
        t0 = time.perf_counter()
        timed_out = False
        say = log or (lambda msg: None)
        try:  # run.py says which variant it is on: passed on as it comes, minutes apart on a slow board
            r = self._exec_lines(argv, timeout=timeout + 30, on_line=lambda ln: ln.startswith("variant ") and say(f"  {self.host}: {ln}"))
            log, rc, err = r.stdout + r.stderr, r.returncode, r.stderr
        except RemoteTimeout as e:  # keep what it printed
            timed_out, log, rc, err = True, e.stdout + e.stderr, None, e.stderr
            self.stop_run(rdir)
        except KeyboardInterrupt:  # Ctrl-C: the ssh client is gone, run.py is not; stop it on the device
            stopped = self.stop_run(rdir)
            prov.update(wall_s=round(time.perf_counter() - t0, 3), finished_at=_now(), returncode=None, interrupted=True, stopped=stopped)
            (out / "provenance.json").write_text(json.dumps(prov, indent=2))
            raise RemoteInterrupted(str(self.host), stopped, self._finished_variants(rdir, out)) from None
        prov.update(wall_s=round(time.perf_counter() - t0, 3), finished_at=_now(), returncode=rc)
        (out / "run.log").write_text(log)
        (out / "provenance.json").write_text(json.dumps(prov, indent=2))
        if timed_out or (rc == 124 and p.has_timeout):
            e = RemoteTimeout(
                f"run.py on {self.host} did not finish within {timeout:g} s", hint=f"its output is in {out / 'run.log'}", stdout=log
            )
            e.partial = self._finished_variants(rdir, out)
            raise e
        if rc != 0:
            raise RemoteCommandError(
                f"run.py failed on {self.host} (exit {rc}): {_last_line(err)}",
                hint=f"the full log is in {out / 'run.log'}",
                returncode=rc,
                stderr=err,
            )
        results = json.loads(self.get(f"{rdir}/results.json", out / "results.json").read_text())
        return {"results": results, "provenance": prov, "transfer": asdict(transfer), "out_dir": str(out)}

    def _finished_variants(self, rdir: str, out: Path) -> dict | None:
        """After a stopped ``run.py --variant``: its results.json with the variants it finished (it rewrites the file after
        each), fetched into ``out``; None when there is none (a single variant's run keeps no partial record)."""
        try:
            data = json.loads(self.get(f"{rdir}/results.json", out / "results.json", timeout=120).read_text())
        except (RemoteError, OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("records") else None


def confined(folder: str, what: str = "--remote-dir") -> str:
    """``folder`` on the device, under the login user's home unless absolute (:func:`dsk_compress.paths.remote_dir`); a
    folder that climbs out with ``..`` (or could reach a command as an option) is a RemoteError."""
    from dsk_compress.paths import remote_dir

    try:
        return remote_dir(folder)
    except ValueError as e:
        raise RemoteError(
            f"{what}: {e}", hint="give a folder under the device user's home (e.g. ~/dsk-compress) or an absolute path"
        ) from None


def _stop_master(argv: list[str], control_dir: str) -> None:
    if os.listdir(control_dir):  # a master socket exists: ask it to exit
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    shutil.rmtree(control_dir, ignore_errors=True)


def _ssh_path(path: str | Path) -> str:
    s = str(path)
    if '"' in s or any(ord(c) < 32 for c in s):
        raise RemoteError(f"unusable file name for ssh: {s!r}", hint="use a path without quotes or control characters")
    return f'"{s}"' if any(c.isspace() for c in s) else s


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in _text(text).splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _tail(text: str) -> str:
    return " | ".join(ln.strip() for ln in _text(text).strip().splitlines()[-TAIL_LINES:] if ln.strip()) or "no message"


def _short(args: Sequence[str]) -> str:
    s = shlex.join(args)
    return s if len(s) <= 120 else s[:117] + "..."


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
