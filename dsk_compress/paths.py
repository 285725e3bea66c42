"""Names and paths that come from files (recipes, device profiles, model cards, reports) or options (``--out``,
``--remote-dir``): each is checked here before it becomes part of a path, so nothing is written or deleted outside
the folder a command owns.

Two rules for a name that becomes one path component:

- :func:`check_name` (names dsk-compress gives: run names, device profile names): 1-100 letters, digits, ``.``,
  ``_``, ``-`` or ``+``, starting with a letter or digit, never ``..``, at most 200 bytes of UTF-8;
- :func:`check_component` (names a user may have chosen, e.g. a run folder's name, a report row's name such as
  ``final [onnxruntime-cuda]``): any single component: not empty, not ``.`` or ``..``, no ``/``, ``\\``, NUL or
  other control character, at most 200 bytes of UTF-8.

:func:`inside` resolves a relative path a file names (a model card's ``model``, a report's ``artifact``) under its
root and refuses absolute paths, ``..`` and symbolic links that lead out. :func:`remote_dir` confines a folder on an
SSH device to the login user's home unless it is given as an absolute path.

Each check raises ``ValueError`` with a sentence saying what is allowed; the caller names the file and field (a
pydantic validator turns it into a field error, a loader into a one-line :class:`~dsk_compress.errors.DskError`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

NAME_CHARS = 100
"""Most characters of a name from :func:`check_name`."""
NAME_BYTES = 200
"""Most UTF-8 bytes of a name (filesystems allow 255 per component; run folders add ``-<time>``, temp files a prefix)."""

_NAME = re.compile(r"\w[\w.+-]{0,%d}" % (NAME_CHARS - 1))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shown(value: object, limit: int = 60) -> str:
    """``value`` as a short printable repr (control characters escaped, long text cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _too_long(value: str) -> bool:
    return len(value.encode("utf-8", "surrogatepass")) > NAME_BYTES


def check_name(value: object, what: str = "name", why: str = "") -> str:
    """``value`` if it is a safe name (see the module doc), else ValueError saying what is allowed.

    Args:
        value: the name.
        what: what it names, in the message (``run name``, ``device name``).
        why: a note appended to the message, e.g. ``(runs are written to <out>/<name>-<time>)``.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value or _too_long(value):
        raise ValueError(
            f"{shown(value)} is not a safe {what}: use 1-{NAME_CHARS} letters, digits, '.', '_', '-' or '+', starting "
            f"with a letter or digit, without '..'" + (f" {why}" if why else "")
        )
    return value


def check_component(value: object, what: str = "name") -> str:
    """``value`` if it can be exactly one path component (see the module doc), else ValueError saying why not."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {shown(value)}")
    if value in ("", ".", ".."):
        raise ValueError(f"{what} {shown(value)} is not a file name")
    if "/" in value or "\\" in value or _CONTROL.search(value):
        raise ValueError(f"{what} {shown(value)} holds a path separator or a control character: it must be one plain name")
    if _too_long(value):
        raise ValueError(f"{what} {shown(value)} is longer than {NAME_BYTES} bytes")
    return value


def check_relative(value: object, what: str = "path") -> str:
    """``value`` if it is a relative path that stays where it is put (no absolute path, no ``..``), else ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty relative path, got {shown(value)}")
    if _CONTROL.search(value) or "\\" in value:
        raise ValueError(f"{what} {shown(value)} holds a backslash or a control character")
    p = PurePosixPath(value)
    if p.is_absolute() or value.startswith("~") or ".." in p.parts:
        raise ValueError(f"{what} {shown(value)} leads outside its folder: give a path relative to it, without '..'")
    if any(_too_long(part) for part in p.parts):
        raise ValueError(f"{what} {shown(value)} has a component longer than {NAME_BYTES} bytes")
    return value


def inside(root: str | os.PathLike, rel: object, what: str = "path") -> Path:
    """``root / rel`` when ``rel`` is a relative path (:func:`check_relative`) that resolves inside ``root`` (symbolic
    links followed), else ValueError."""
    check_relative(rel, what)
    root = Path(root)
    full = root / str(rel)
    real_root, real = root.resolve(), full.resolve()
    if real != real_root and real_root not in real.parents:
        raise ValueError(f"{what} {shown(rel)} leads outside {root} (through a symbolic link)")
    return full


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` is ``root`` or lies under it, both resolved (symbolic links followed)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def remote_dir(value: object) -> str:
    """A folder on an SSH device: ``~`` / ``~/...`` / a relative path are the login user's home (a relative path is made
    ``~/...``); an absolute path is taken as given. ``..`` anywhere, ``~user``, control characters and a component
    that starts with ``-`` (it would reach a command as an option) are refused with ValueError."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"--remote-dir must be a folder, got {shown(value)}")
    if _CONTROL.search(value) or "\\" in value:
        raise ValueError(f"--remote-dir {shown(value)} holds a backslash or a control character")
    if value.startswith("~") and not (value == "~" or value.startswith("~/")):
        raise ValueError(f"--remote-dir {shown(value)}: only ~ (the login user's home) is expanded, not ~user")
    p = PurePosixPath(value[2:] if value.startswith("~/") else "" if value == "~" else value)
    if ".." in p.parts:
        raise ValueError(
            f"--remote-dir {shown(value)} climbs out with '..': give a folder under the device user's home "
            "(e.g. ~/dsk-compress) or an absolute path"
        )
    if any(part.startswith("-") for part in p.parts):
        raise ValueError(f"--remote-dir {shown(value)} has a part that starts with '-'")
    if any(_too_long(part) for part in p.parts):
        raise ValueError(f"--remote-dir {shown(value)} has a component longer than {NAME_BYTES} bytes")
    if p.is_absolute():
        return str(p)
    return "~" if str(p) == "." else f"~/{p}"


__all__ = ["NAME_BYTES", "NAME_CHARS", "check_component", "check_name", "check_relative", "inside", "is_within", "remote_dir", "shown"]
