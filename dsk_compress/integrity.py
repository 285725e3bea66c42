"""Integrity of run directories: what a stage wrote is recorded (size + sha256) and checked before it is read again.

When a stage finishes, the runner records every file under the stage's folder in the manifest entry of
that stage (``files``). (The report files at the run's top level are rebuilt by later commands, e.g.
``dsk-compress bench`` adding a device; ``report.json`` is validated by its typed model when read, and
the artifacts it names are the export stage's, recorded here.) Before a
later stage runs, on ``--resume``, and in ``dsk-compress export`` / ``report``, :func:`verify_stage`
re-hashes them; a missing, truncated or altered file is a one-line :class:`RunError` naming the file and
the command that rebuilds it (``dsk-compress recipe NAME --run-dir RUN --resume --rerun-from STAGE``).
Each file is hashed once, when its stage finishes: the record keeps its size and mtime (``mtime_ns``) beside the
sha256, and a later check trusts a file whose size and mtime match the record without reading it again (a 2 GB
graph is not re-read on every ``--resume`` or ``dsk-compress export``). A file whose mtime differs is re-hashed; a
size change is always caught. The trade-off: a same-size edit that also restores the mtime (deliberate tampering
with ``touch -d``) passes; ``verify_stage(..., full=True)`` re-hashes everything regardless. Records written
before mtimes were kept are hashed as before.

:func:`read_manifest` checks the manifest's own shape (an object with a ``stages`` list of entries).
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any

from dsk_compress.errors import RunError

_CHUNK = 1 << 20
_verified: dict[str, tuple[int, int, str]] = {}  # absolute path -> (size, mtime_ns, sha256) seen in this process


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digest(path: Path) -> dict[str, Any]:
    st = path.stat()
    digest = sha256_file(path)
    _verified[str(path.resolve())] = (st.st_size, st.st_mtime_ns, digest)
    return {"size": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns}


def record_files(run_dir: str | Path, stage_dir: str) -> dict[str, dict[str, Any]]:
    """``{path relative to the run: {size, sha256, mtime_ns}}`` of every file under ``run_dir/stage_dir``."""
    rd = Path(run_dir)
    rels = sorted(str(p.relative_to(rd)) for p in (rd / stage_dir).rglob("*") if p.is_file()) if (rd / stage_dir).is_dir() else []
    return {rel: _digest(rd / rel) for rel in rels}


def rebuild_command(run_dir: str | Path, manifest: dict, stage: str) -> str:
    """The command that runs ``stage`` (and the later ones) of this run again."""
    src = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    recipe = src.get("recipe") or manifest.get("name") or "RECIPE"
    sets = "".join(f" --set {shlex.quote(str(s))}" for s in src.get("overrides") or [])
    return f"dsk-compress recipe {shlex.quote(str(recipe))}{sets} --run-dir {shlex.quote(str(run_dir))} --resume --rerun-from {stage}"


def verify_stage(run_dir: str | Path, manifest: dict, entry: dict, full: bool = False) -> None:
    """Check the files a finished stage recorded; raise RunError naming the first bad one and the rebuild command.

    A file whose size and mtime match its record is trusted without hashing it (see the module's note on the
    trade-off); ``full`` re-hashes every file."""
    files = entry.get("files")
    if not isinstance(files, dict):
        return  # a run written before files were recorded
    rd = Path(run_dir)
    for rel, want in files.items():
        p = rd / rel
        fix = f"rebuild it with: {rebuild_command(rd, manifest, entry.get('stage', '?'))}"
        if not isinstance(want, dict):
            raise RunError(f"manifest.json of {rd} has a malformed record for {rel}", hint=fix)
        try:
            st = p.stat()
        except OSError:
            raise RunError(f"{p} is missing (written by the {entry.get('stage')!r} stage)", hint=fix) from None
        if st.st_size != want.get("size"):
            raise RunError(
                f"{p} is corrupt: {st.st_size:,} bytes, the {entry.get('stage')!r} stage wrote {want.get('size'):,}"
                if isinstance(want.get("size"), int)
                else f"{p} is corrupt (size differs from the record)",
                hint=fix,
            )
        if not full and isinstance(want.get("mtime_ns"), int) and want["mtime_ns"] == st.st_mtime_ns:
            continue  # size and mtime as recorded when the stage hashed it
        seen = _verified.get(str(p.resolve()))
        digest = seen[2] if seen and seen[:2] == (st.st_size, st.st_mtime_ns) and not full else sha256_file(p)
        if digest != want.get("sha256"):
            raise RunError(f"{p} is corrupt: its sha256 differs from what the {entry.get('stage')!r} stage wrote", hint=fix)
        _verified[str(p.resolve())] = (st.st_size, st.st_mtime_ns, digest)


def read_manifest(run_dir: str | Path) -> dict:
    """``run_dir/manifest.json``, checked to be a run manifest (an object whose ``stages`` is a list of stage entries)."""
    from dsk_compress.io import read_json

    path = Path(run_dir) / "manifest.json"
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir} is not a run directory", hint="give a folder that dsk-compress recipe wrote (runs/<recipe>-<time>)")
    if not path.is_file():
        raise RunError(f"{run_dir} has no manifest.json", hint="give a folder that dsk-compress recipe wrote (runs/<recipe>-<time>)")
    data = read_json(path)
    hint = "the manifest is damaged; start a new run (or restore manifest.json from a backup)"
    if not isinstance(data, dict):
        raise RunError(f"{path} is not a run manifest (a JSON {type(data).__name__}, not an object)", hint=hint)
    stages = data.get("stages")
    if not isinstance(stages, list) or not all(isinstance(e, dict) and isinstance(e.get("stage"), str) for e in stages):
        raise RunError(f"{path} has no valid 'stages' list", hint=hint)
    for e in stages:
        for key in ("outputs", "metrics", "files"):
            if key in e and not isinstance(e[key], dict):
                raise RunError(f"{path}: stage {e['stage']!r} has a malformed {key!r}", hint=hint)
    if not isinstance(data.get("recipe"), dict):
        raise RunError(f"{path} holds no recipe", hint=hint)
    return data


def verify_run(run_dir: str | Path) -> dict:
    """Read and check a run's manifest and every file its finished stages recorded; return the manifest."""
    manifest = read_manifest(run_dir)
    for entry in manifest["stages"]:
        if entry.get("status") == "done":
            verify_stage(run_dir, manifest, entry)
    return manifest


def check_onnx_loads(path: str | Path, what: str, hint: str) -> None:
    """Open ``path`` in an ONNX Runtime session (CPU); a file that does not load is a RunError naming it."""
    p = Path(path)
    if not p.is_file():
        raise RunError(f"{what} {p} is missing", hint=hint)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf classes
        raise RunError(f"{what} {p} does not load in ONNX Runtime: {str(e).splitlines()[0][:160]}", hint=hint) from None


def check_run_artifacts(run_dir: str | Path) -> dict:
    """Before anything is copied out of a run (``dsk-compress export``): the manifest, every recorded file's hash, and
    every ONNX file the report or the export stage names loading in ONNX Runtime. Returns the manifest."""
    from dsk_compress.io import read_json

    rd = Path(run_dir)
    manifest = verify_run(rd)
    export = next((e for e in manifest["stages"] if e["stage"] == "export"), None)
    hint = f"rebuild it with: {rebuild_command(rd, manifest, 'export')}" if export else "re-run the recipe"
    paths: list[str] = []
    report = read_json(rd / "report.json") if (rd / "report.json").is_file() else {}
    for v in report.get("variants", []) if isinstance(report, dict) else []:
        if isinstance(v, dict) and isinstance(v.get("artifact"), str):
            paths.append(v["artifact"])
    arts = (export or {}).get("outputs", {}).get("artifacts", {})
    for a in arts.values() if isinstance(arts, dict) else []:
        if isinstance(a, dict):
            paths += [a[k] for k in ("path", "kv_cache_path") if isinstance(a.get(k), str)]
    for rel in dict.fromkeys(paths):
        if rel.endswith(".onnx"):
            check_onnx_loads(rd / rel, "artifact", hint)
    return manifest
