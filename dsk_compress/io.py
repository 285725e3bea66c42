"""Atomic file writes, safe checkpoint loading, and full-disk / permission errors said in one line."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def ensure_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` (and its parents) or raise a RunError naming ``what`` (e.g. ``--out``) and why not:
    a file in the way, no permission, a read-only filesystem."""
    from dsk_compress.errors import RunError

    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise RunError(f"{what} {path}: {parent} is a file, not a folder", hint=f"choose another {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        full = storage_error(e, path, f"cannot create {what} {path}") if e.errno in _FULL_ERRNOS else None
        raise full or RunError(f"cannot create {what} {path}: {e.strerror or e}", hint=f"choose a {what} you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunError(f"{what} {path} is not writable", hint=f"choose a {what} you can write to")
    return path


def atomic_path(path: str | os.PathLike) -> tuple[Path, Path]:
    """Return ``(tmp, final)`` for writers that need a path (torch.save, onnx.save); call ``commit``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    return tmp, final


def commit(tmp: Path, final: Path) -> Path:
    if tmp.is_file():  # some writers (safetensors, ONNX Runtime's external data) create 0600 files: readable like the rest
        os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    return final


def read_json(path: str | os.PathLike) -> Any:
    from dsk_compress.errors import RunError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise RunError(f"corrupt JSON in {path}: {e.msg} at line {e.lineno}", hint="delete it or re-run the stage") from None


def save_state_dict(state: dict, path: str | os.PathLike) -> Path:
    """Save a tensor state dict as safetensors, atomically. Only what safetensors refuses is copied: a tensor whose storage
    an earlier one already uses (tied weights) and a non-contiguous one; the others are written from where they lie (a
    clone of every tensor cost a whole model's size in memory at each save: 1.5 GB more peak for a 375M fp32 student)."""
    from safetensors.torch import save_file

    tmp, final = atomic_path(path)
    tensors, storages = {}, set()
    for k, v in state.items():
        v = v.detach()
        key = (v.device, v.untyped_storage().data_ptr()) if v.numel() else None
        if key is not None and key in storages:
            v = v.clone()
        elif key is not None:
            storages.add(key)
        tensors[k] = v.contiguous()
    save_file(tensors, str(tmp))
    return commit(tmp, final)


def load_state_dict(path: str | os.PathLike) -> dict:
    """Load a safetensors state dict; a corrupt or missing file becomes a ModelSourceError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dsk_compress.errors import ModelSourceError

    p = Path(path)
    if not p.is_file():
        raise ModelSourceError(f"checkpoint not found: {p}", hint="check the path")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelSourceError(f"corrupt checkpoint {p}: {e}", hint="re-create it or point to a valid .safetensors file") from None


# --------------------------------------------------------------------------- full disks, read-only disks, permissions

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}
# what libraries that do not raise OSError say (safetensors' Rust IoError, protobuf, torch's stream writer)
_FULL_TEXT = re.compile(r"No space left on device|StorageFull|os error 28\b|Errno 28\b|ENOSPC|Disk quota exceeded|os error 122\b", re.I)
_WRITE_FAILED_TEXT = re.compile(r"file write failed|failed writing|unexpected pos|write failed|short write", re.I)
NEARLY_FULL_BYTES = 16 << 20
"""A write that failed without saying why (torch's ``PytorchStreamWriter failed writing file``) counts as a full disk when
less than this (or 1% of the disk) is free."""
TEMP_SUFFIXES = (".tmp", ".part")
"""Names of the files and folders writers here fill before renaming them into place (see :func:`remove_temp_files`)."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen and len(seen) < 20:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_space(path: str | os.PathLike) -> tuple[int, int, Path]:
    """``(free bytes, total bytes, folder)`` of the filesystem holding ``path`` (its nearest existing folder)."""
    p = Path(path).absolute()
    for folder in (p, *p.parents):
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            continue
        return usage.free, usage.total, folder
    return 0, 0, p


def storage_problem(exc: BaseException, where: str | os.PathLike | None = None) -> tuple[str, str | None] | None:
    """``(kind, file)`` when ``exc`` (or an exception that caused it) is a write that failed on a full disk
    (``"full"``), a read-only filesystem (``"read-only"``) or a permission (``"denied"``); else None.

    ``where``: where the failed command was writing; a write failure that names no cause counts as a full disk when that
    disk is (nearly) full.
    """
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return "full", e.filename
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            return "read-only", e.filename
        if isinstance(e, OSError) and e.errno in _DENIED_ERRNOS:
            return "denied", e.filename
    for e in chain:
        if _FULL_TEXT.search(str(e)):
            return "full", getattr(e, "filename", None)
    if where is not None and any(_WRITE_FAILED_TEXT.search(str(e)) for e in chain):
        free, total, _ = free_space(where)
        if free < max(NEARLY_FULL_BYTES, total // 100):
            return "full", None
    return None


def format_bytes(n: int | float) -> str:
    """``12.3 MB``, ``1.5 GB``, ``812 kB`` (decimal units, as ``df -H`` prints them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def storage_error(exc: BaseException, where: str | os.PathLike, what: str, needed: int | str | None = None, hint: str | None = None):
    """A one-line :class:`~dsk_compress.errors.RunError` for a write that failed on a full disk, a read-only filesystem or
    a permission (see :func:`storage_problem`), with the free space and, where known, the space ``needed`` (bytes, or a
    phrase such as ``"at least 12.0 MB more"``); None when ``exc`` is another failure.

    Args:
        exc: the exception raised by the write.
        where: the folder the command writes to (its disk's free space is reported).
        what: what was being done, the message's start (``stage 'distill'``, ``export``).
        needed: the space the command needs, when it is known.
        hint: how to continue (default: free space and run the command again).
    """
    from dsk_compress.errors import RunError

    found = storage_problem(exc, where)
    if found is None:
        return None
    kind, filename = found
    free, total, folder = free_space(filename or where)
    head = f"{what}: " if what else ""
    if kind == "full":
        need = "" if needed is None else f"; it needs {needed if isinstance(needed, str) else 'about ' + format_bytes(needed)}"
        return RunError(
            f"{head}the disk is full: {format_bytes(free)} free of {format_bytes(total)} on {folder}{need}",
            hint=hint or "free some space (or choose a folder on another disk) and run the command again",
        )
    target = filename or where
    if kind == "read-only":
        return RunError(f"{head}{target} is on a read-only filesystem", hint=hint or "choose a folder you can write to")
    return RunError(f"{head}permission denied: {target}", hint=hint or "check the folder's owner and permissions, or choose another")


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Delete what the atomic writers left half-written under ``folder`` (names ending in :data:`TEMP_SUFFIXES`: a temp
    file or folder is renamed into place only once complete, so one that is still there is incomplete); returns the
    bytes freed. Only ever called on a folder a run owns (a stage's folder)."""
    root = Path(folder)
    if not root.is_dir():
        return 0
    freed = 0
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if not p.name.endswith(TEMP_SUFFIXES) or not p.exists():
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(p, ignore_errors=True)
            else:
                freed += p.lstat().st_size
                p.unlink()
        except OSError:
            pass
    return freed


def write_json_in_place(path: str | os.PathLike, obj: Any) -> None:
    """Overwrite ``path`` with ``obj`` as JSON in place (no temp file): the last way to record a failure on a full disk,
    where a temp file + rename has no room. Not atomic: use only where the alternative is recording nothing."""
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8")
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
