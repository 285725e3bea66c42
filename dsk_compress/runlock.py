"""One process at a time in a run directory: an exclusive ``flock`` on ``<run>/.lock``.

The lock is an advisory ``fcntl.flock`` on an open file, so the operating system drops it when the
owner exits in any way (``kill -9`` included): a lock file left behind by a dead process is stale by
construction, and the next run takes it over. The file holds the owner's pid, host, start time and
command line, only so that a refused process can say who holds the run. Where the filesystem has no
``flock`` (some network mounts), the pid recorded in the file decides: a dead pid on this host is stale.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from dsk_compress.errors import RunError

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def read_owner(run_dir: str | Path) -> dict | None:
    """The owner recorded in ``run_dir/.lock`` (pid, host, started, command), or None."""
    try:
        data = json.loads((Path(run_dir) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    return (
        f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')}"
        + (f": {owner['command']}" if owner.get("command") else "")
        + ")"
    )


class RunLock:
    """An exclusive lock on a run directory; use as a context manager or call :meth:`acquire` / :meth:`release`.

    Raises:
        RunError: on :meth:`acquire`, when a live process holds the run (the message names it).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale owner this lock replaced, if any

    def acquire(self) -> RunLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(
                f"cannot create the lock file {self.path}: {e.strerror or e}",
                hint="choose a run directory you can write to (--out / --run-dir)",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(
                f"{self.run_dir} is in use by {_describe(read_owner(self.run_dir))}",
                hint="wait for it to finish or stop it (Ctrl-C), then --resume; one process at a time per run",
            ) from None
        except OSError:  # no flock on this filesystem: fall back to the recorded pid
            prev = read_owner(self.run_dir)
            if (
                prev
                and prev.get("host") == socket.gethostname()
                and isinstance(prev.get("pid"), int)
                and _pid_alive(prev["pid"])
                and prev["pid"] != os.getpid()
            ):
                os.close(fd)
                raise RunError(
                    f"{self.run_dir} is in use by {_describe(prev)}", hint="wait for it to finish or stop it, then --resume"
                ) from None
        prev = read_owner(self.run_dir)
        if prev and prev.get("pid") != os.getpid():
            self.took_over = prev  # its process is gone: the OS released its flock
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock. The file stays, emptied: removing it would let a process that opened it just before take a
        lock on a file no one else sees any more."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
