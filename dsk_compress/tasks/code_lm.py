"""The built-in ``code-lm`` task: next-byte prediction on the Python standard library's own source.

The corpus is the ``.py`` source of the interpreter that runs it (no download), or of a given
standard-library folder (``stdlib_root``: e.g. another machine's ``lib/python3.11`` copied over, so a
host with another Python trains on the same corpus), read byte-level (vocabulary 256), split into
train/validation by a hash of each file's relative path, and cached as a uint8 array. Metrics:
next-byte accuracy (%) and bits per byte on a fixed validation sample.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import re
import sysconfig
from pathlib import Path

import numpy as np

from dsk_compress.errors import TaskError
from dsk_compress.io import atomic_path, commit
from dsk_compress.tasks.base import Metrics, PredictFn, WindowedLMTask

VOCAB_SIZE = 256
DOC_SEPARATOR = 0  # NUL never occurs in source text; it marks file boundaries
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def cache_dir() -> Path:
    return Path(os.environ.get("DSK_COMPRESS_CACHE", Path.home() / ".cache" / "dsk-compress"))


def own_stdlib() -> Path:
    """The standard-library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_version(root: str | Path | None = None) -> str | None:
    """The Python version whose standard library ``root`` is (``None``: unknown).

    The running interpreter's own folder gives its full version (``3.11.7``). Any other folder gives the
    ``X.Y`` its build data (``_sysconfigdata_*.py``, a ``.py`` file copied with the rest) or its name
    (``python3.11``) states: the patch level is not recorded in ``.py`` files.
    """
    root = Path(root) if root else own_stdlib()
    if root.resolve() == own_stdlib().resolve():
        return platform.python_version()
    for p in sorted(root.glob("_sysconfigdata*.py")):
        m = re.search(r"""['"]VERSION['"]\s*:\s*['"](\d+\.\d+)['"]""", p.read_text(errors="replace"))
        if m:
            return m.group(1)
    m = re.fullmatch(r"python(\d+\.\d+)", root.resolve().name)
    return m.group(1) if m else None


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """All ``.py`` files of the standard library, as sorted ``(relative path, path)`` pairs."""
    root = Path(root or own_stdlib())
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in filenames:
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                out.append((p.relative_to(root).as_posix(), p))
    out.sort()
    return out


def is_validation(relpath: str, val_percent: int) -> bool:
    """Deterministic split: a file is in validation if the hash of its path falls in the bucket."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little")
    return h % 100 < val_percent


def build_corpus(root: str | Path | None = None, val_percent: int = 5) -> tuple[np.ndarray, np.ndarray, str]:
    """Read (or load from cache) the byte corpus. Returns ``(train, val, fingerprint)``."""
    files = stdlib_files(root)
    if not files:
        raise TaskError(
            f"code-lm: no .py files under {root}",
            hint="stdlib_root must be a Python standard-library folder, e.g. /usr/lib/python3.11 or a copy of one",
        )
    listing = hashlib.sha256()
    for rel, p in files:
        listing.update(f"{rel}:{p.stat().st_size}\n".encode())
    listing.update(f"val={val_percent}".encode())
    fp = listing.hexdigest()[:16]
    cdir = cache_dir() / "code-lm"
    paths = {s: cdir / f"{fp}-{s}.npy" for s in ("train", "val")}
    if all(p.is_file() for p in paths.values()):
        try:
            return np.load(paths["train"]), np.load(paths["val"]), fp
        except (ValueError, OSError):
            pass  # corrupt cache: rebuild below
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for rel, p in files:
        data = p.read_bytes().replace(b"\x00", b"")
        parts["val" if is_validation(rel, val_percent) else "train"].append(data + bytes([DOC_SEPARATOR]))
    arrays = {s: np.frombuffer(b"".join(v), dtype=np.uint8).copy() for s, v in parts.items()}
    for s, arr in arrays.items():
        tmp, final = atomic_path(paths[s])
        with open(tmp, "wb") as f:
            np.save(f, arr)
        commit(tmp, final)
    return arrays["train"], arrays["val"], fp


class CodeLMTask(WindowedLMTask):
    """Byte-level next-token prediction on standard-library source code.

    Args:
        seq_len: tokens per sequence (model input length).
        eval_sequences: number of fixed validation windows (evenly spaced over the split).
        val_percent: percentage of files that go to validation.
        seed: seed of the training-window sampler.
        stdlib_root: the standard-library folder to read (default: the running interpreter's). The corpus
            fingerprint depends on the files' relative paths and sizes, not on where the folder lies.
    """

    name = "code-lm"
    vocab_size = VOCAB_SIZE

    def __init__(
        self, seq_len: int = 256, eval_sequences: int = 128, val_percent: int = 5, seed: int = 0, stdlib_root: str | Path | None = None
    ) -> None:
        self.seq_len = seq_len
        self.eval_sequences = eval_sequences
        self.seed = seed
        self.stdlib_root = Path(stdlib_root or own_stdlib()).resolve()
        self.train, self.val, self._fp = build_corpus(self.stdlib_root, val_percent)
        if len(self.val) < (seq_len + 1) * 2 or len(self.train) < (seq_len + 1) * 2:
            raise TaskError(
                f"code-lm: the corpus under {self.stdlib_root} is too small for seq_len {seq_len} "
                f"({len(self.train):,} train and {len(self.val):,} validation bytes)",
                hint="use a full standard-library folder or a shorter seq_len",
            )
        n = len(self.val) - seq_len - 1
        self._eval_starts = np.linspace(0, n, eval_sequences).astype(np.int64)

    def fingerprint(self) -> str:
        return f"code-lm:{self._fp}:L{self.seq_len}:E{self.eval_sequences}"

    def describe(self) -> dict:
        """The corpus: the Python version whose standard library was read, its folder and fingerprint, and the split sizes."""
        return {
            "name": self.name,
            "python": stdlib_version(self.stdlib_root),
            "stdlib_root": str(self.stdlib_root),
            "corpus_fingerprint": self._fp,
            "train_bytes": int(len(self.train)),
            "val_bytes": int(len(self.val)),
            "seq_len": self.seq_len,
            "eval_tokens": int(self.eval_sequences * (self.seq_len - 1)),
        }

    def evaluate(self, predict: PredictFn, batch_size: int = 16) -> Metrics:
        """Next-byte accuracy (%) and bits per byte of ``predict`` on the fixed validation sample."""
        correct, nll, count = self.score(predict, batch_size)
        return Metrics(
            accuracy=100.0 * correct / count,
            extra={"bits_per_byte": nll / count / math.log(2), "eval_tokens": float(count)},
        )
