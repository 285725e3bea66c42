"""The built-in ``code-lm`` task: next-byte prediction on the Python standard library's own source.

The corpus is the ``.py`` source of the interpreter that runs it (no download), read byte-level
(vocabulary 256), split into train/validation by a hash of each file's relative path, and cached
as a uint8 array. Metrics: next-byte accuracy (%) and bits per byte on a fixed validation sample.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from dsk_compress.io import atomic_path, commit
from dsk_compress.tasks.base import Metrics, PredictFn, WindowedLMTask

VOCAB_SIZE = 256
DOC_SEPARATOR = 0  # NUL never occurs in source text; it marks file boundaries
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def cache_dir() -> Path:
    return Path(os.environ.get("DSK_COMPRESS_CACHE", Path.home() / ".cache" / "dsk-compress"))


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """All ``.py`` files of the standard library, as sorted ``(relative path, path)`` pairs."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
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
    """

    name = "code-lm"
    vocab_size = VOCAB_SIZE

    def __init__(self, seq_len: int = 256, eval_sequences: int = 128, val_percent: int = 5, seed: int = 0, root: str | None = None) -> None:
        self.seq_len = seq_len
        self.eval_sequences = eval_sequences
        self.seed = seed
        self.train, self.val, self._fp = build_corpus(root, val_percent)
        if len(self.val) < (seq_len + 1) * 2 or len(self.train) < (seq_len + 1) * 2:
            raise ValueError("corpus too small for the requested sequence length")
        n = len(self.val) - seq_len - 1
        self._eval_starts = np.linspace(0, n, eval_sequences).astype(np.int64)

    def fingerprint(self) -> str:
        return f"code-lm:{self._fp}:L{self.seq_len}:E{self.eval_sequences}"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "python": sys.version.split()[0],
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
