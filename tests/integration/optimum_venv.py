"""A Python with Hugging Face Optimum's ``ORTModelForCausalLM``, for the tests of ``dsk-compress export --format optimum``.

optimum-onnx 0.1.0 (its only release, where ``ORTModelForCausalLM`` lives now) requires ``transformers<4.58`` and
``optimum~=2.1``, and the project runs transformers 5, so Optimum gets a venv of its own. It borrows everything else
(torch, onnxruntime, numpy, ...) from the venv running the tests through a ``.pth`` file, and installs only what must
differ: the pins below, into its own site-packages, which come first on its path. About 30 MB and 20 s from PyPI.

Cached under ``$DSK_TEST_CACHE`` (default ``~/.cache/dsk-compress-test``)``/optimum/<key>``, the key hashing the pins,
this Python's version and the borrowed site-packages; ``python tests/integration/optimum_venv.py`` builds it (CI does,
before the tests) and prints its python.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

PINS = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "huggingface_hub==0.36.2", "tokenizers==0.22.2")
"""A known-good set (docs: optimum-onnx 0.1.0 with transformers 4.57.6 and optimum 2.1.0)."""


class Unavailable(RuntimeError):
    """The venv cannot be made here (no network, no index, a pin that does not install): tests skip with this reason."""


def _borrowed() -> list[str]:
    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def cache_dir() -> Path:
    base = os.environ.get("DSK_TEST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsk-compress-test"
    return Path(base) / "optimum"


def venv_key() -> str:
    text = "\n".join([*PINS, sys.version, *_borrowed()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def optimum_python(log=print) -> Path:
    """The venv's python, built first when not cached; raises :class:`Unavailable` when it cannot be."""
    venv = cache_dir() / venv_key()
    py = venv / "bin" / "python"
    if (venv / "ready").is_file() and py.is_file():
        return py
    shutil.rmtree(venv, ignore_errors=True)  # a half-built one from a killed run
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the Optimum venv {venv} ({', '.join(PINS)})")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, text=True, timeout=120)
        own = Path(
            subprocess.run(
                [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
        )
        (own / "dsk-borrowed.pth").write_text("".join(f"{p}\n" for p in _borrowed()))  # after its own site-packages
        # pip (borrowed too) installs into the new venv; the borrowed copies of transformers & co. stay untouched
        proc = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-input", *PINS],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            raise Unavailable(f"pip cannot install {' '.join(PINS)}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        check = subprocess.run(
            [str(py), "-c", "import transformers, optimum.onnxruntime as o; o.ORTModelForCausalLM; print(transformers.__version__)"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check.returncode != 0 or not check.stdout.strip().startswith("4.57"):
            raise Unavailable(f"the Optimum venv does not import: {(check.stderr or check.stdout).strip().splitlines()[-1:]}")
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(venv, ignore_errors=True)
        raise Unavailable(f"cannot build the Optimum venv: {e}") from None
    except Unavailable:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    (venv / "ready").write_text("\n".join(PINS) + "\n")
    return py


if __name__ == "__main__":
    try:
        print(optimum_python(log=lambda m: print(m, file=sys.stderr)))
    except Unavailable as e:
        print(f"optimum venv unavailable: {e}", file=sys.stderr)
        sys.exit(1)
