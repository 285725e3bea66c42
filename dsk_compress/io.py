"""Atomic file writes and safe checkpoint loading."""

from __future__ import annotations

import json
import os
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
        raise RunError(f"cannot create {what} {path}: {e.strerror or e}", hint=f"choose a {what} you can write to") from None
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
    """Save a tensor state dict as safetensors, atomically (shared tensors are cloned)."""
    from safetensors.torch import save_file

    tmp, final = atomic_path(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
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
