"""An emulated aarch64 board for the remote tests: arm64 Python 3.11 under QEMU user mode, plus an aarch64 wheelhouse.

What a Raspberry Pi OS Bookworm board offers, built without root, chroot or binfmt_misc:

- ``sysroot/``: Debian bookworm arm64 packages (python3.11, python3.11-venv with its ensurepip wheels,
  libstdc++6 for onnxruntime) downloaded with a private apt configuration and unpacked with
  ``dpkg-deb -x``; the standard library is byte-compiled at build time (see ``_compile_stdlib``).
- ``sysroot/proc/cpuinfo``: an ARM Cortex-A72 file. ``qemu-aarch64-static -L SYSROOT`` looks a path up
  in the sysroot first; without it QEMU passes the host's x86 cpuinfo through and onnxruntime crashes.
- ``bin/python3``: the board's interpreter, a shell wrapper running
  ``qemu-aarch64-static -L SYSROOT -0 "$0" SYSROOT/usr/bin/python3.11 "$@"``. ``-0 "$0"`` makes the
  emulated Python see the wrapper's own path as ``argv[0]``, so ``sys.executable`` is the wrapper and
  ``python3 -m venv V`` links ``V/bin/python`` to it. Running ``V/bin/python`` then runs the wrapper
  with ``$0 = V/bin/python``: Python finds ``V/pyvenv.cfg`` next to it and uses the venv, exactly as on a
  real board. (Without ``-0`` the venv would link to the aarch64 ELF, which the host cannot execute.)
- ``wheelhouse/``: aarch64 cp311 wheels of numpy, onnxruntime and tokenizers at the versions pinned in
  ``constraints.txt`` (what the host runs), the oldest onnxruntime bundles allow (1.18.1, with a
  numpy 1.x it was built for), and their dependencies: the offline install of ``ensure_venv``.

Everything lives under ``$DSK_TEST_CACHE`` (default ``~/.cache/dsk-compress-test``)``/aarch64/<key>``,
where the key hashes every input above, so later sessions reuse it and a changed pin builds a new board.
Build it ahead of a test session (CI does) with ``python tests/remote/board.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BOARD_FORMAT = 1  # bump when the layout or the build steps change
SUITES = ("bookworm", "bookworm-updates")
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security bookworm-security main"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEB_PACKAGES = ("python3.11", "python3.11-venv", "libstdc++6")
PIP_TAGS = (
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_aarch64",
    "--platform",
    "manylinux2014_aarch64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
    "--abi",
    "abi3",
    "--abi",
    "none",
)
PINNED = ("numpy", "onnxruntime", "tokenizers", "huggingface_hub")  # at the constraints.txt versions, as on the host
FLOOR = ("onnxruntime==1.18.1", "numpy==1.26.4")  # the oldest onnxruntime that loads the bundles, built for numpy 1.x
REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-aarch64-static"
_CPU_BLOCK = (
    "processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
)


@dataclass(frozen=True)
class Board:
    """A built board: ``python`` is the interpreter to hand to ``Remote(python=...)``."""

    root: Path
    python: Path
    sysroot: Path
    wheelhouse: Path


def missing_tools() -> list[str]:
    """What this machine lacks to run the board, and to build it when it is not cached (empty: nothing)."""
    missing = [QEMU] if shutil.which(QEMU) is None else []
    if not (cache_dir() / board_key() / "ready").is_file():
        missing += [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
        if not KEYRING.is_file():
            missing.append(str(KEYRING) + " (debian-archive-keyring)")
    return missing


def pinned_wheels() -> list[str]:
    """``name==version`` for each of PINNED, read from the repository's constraints.txt."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))
    return [f"{n}=={pins[n]}" for n in PINNED]


def board_key() -> str:
    """A short hash of everything the board is built from."""
    spec = [BOARD_FORMAT, SUITES, SECURITY, DEB_PACKAGES, PIP_TAGS, pinned_wheels(), FLOOR, _CPU_BLOCK]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where boards are cached: ``$DSK_TEST_CACHE/aarch64`` (default ``~/.cache/dsk-compress-test/aarch64``)."""
    base = os.environ.get("DSK_TEST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsk-compress-test"
    return Path(base) / "aarch64"


def board(log=print) -> Board:
    """The cached board, built first if needed (several minutes, about 400 MB; needs apt and PyPI)."""
    final = cache_dir() / board_key()
    if (final / "ready").is_file():
        return _layout(final)
    if missing := missing_tools():
        raise RuntimeError("cannot build the aarch64 board, missing: " + ", ".join(missing))
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    b = _layout(final)  # the wrapper names the final paths: the folder is renamed into place at the end
    _sysroot(tmp / "sysroot", tmp / "apt", log)
    _wrapper(tmp / "bin" / "python3", b.sysroot)
    _wheelhouse(tmp / "wheelhouse", log)
    shutil.rmtree(tmp / "apt")
    sysroot = tmp / "sysroot"  # the wrapper names the final paths: check the interpreter by calling QEMU directly
    check = subprocess.run(
        [
            shutil.which(QEMU),
            "-L",
            str(sysroot),
            str(sysroot / "usr/bin/python3.11"),
            "-c",
            "import platform, venv, ensurepip; print(platform.machine())",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check.stdout.strip() != "aarch64":
        raise RuntimeError(f"the board's python does not run: {check.stderr.strip()[-500:]}")
    (tmp / "ready").write_text(json.dumps({"key": board_key(), "built_s": round(time.perf_counter() - t0, 1)}))
    try:
        tmp.rename(final)
    except OSError:  # another session built it at the same time: keep theirs
        shutil.rmtree(tmp)
    log(f"aarch64 board ready in {time.perf_counter() - t0:.0f} s: {final}")
    return b


def _layout(root: Path) -> Board:
    return Board(root, root / "bin" / "python3", root / "sysroot", root / "wheelhouse")


def _run(cmd: list[str], **kw) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")


def _sysroot(sysroot: Path, apt: Path, log) -> None:
    """Download the arm64 .debs with a private apt state (the host's apt is left alone) and unpack them."""
    for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (apt / d).mkdir(parents=True)
    (apt / "status").write_text("")  # nothing is installed: apt fetches the whole dependency closure
    signed = f"[arch=arm64 signed-by={KEYRING}]"
    (apt / "sources.list").write_text("".join(f"deb {signed} {MIRROR} {s} main\n" for s in SUITES) + f"deb {signed} {SECURITY}\n")
    conf = {
        "APT::Architecture": "arm64",
        "APT::Install-Recommends": "false",
        "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
        "Dir::State": apt,
        "Dir::State::Lists": apt / "lists",
        "Dir::State::status": apt / "status",
        "Dir::Cache": apt / "cache",
        "Dir::Etc::SourceList": apt / "sources.list",
        "Dir::Etc::SourceParts": apt / "sources.list.d",
        "Dir::Etc::PreferencesParts": apt / "preferences.d",
    }
    (apt / "apt.conf").write_text('APT::Architectures { "arm64"; };\n' + "".join(f'{k} "{v}";\n' for k, v in conf.items() if v))
    env = {**os.environ, "APT_CONFIG": str(apt / "apt.conf"), "DEBIAN_FRONTEND": "noninteractive"}
    log("aarch64 board: downloading Debian arm64 packages")
    _run(["apt-get", "-q", "update"], env=env, timeout=600)
    _run(["apt-get", "-q", "install", "-y", "--download-only", *DEB_PACKAGES], env=env, timeout=900)
    for deb in sorted((apt / "cache" / "archives").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(sysroot)])
    (sysroot / "proc").mkdir()
    (sysroot / "proc" / "cpuinfo").write_text("".join(_CPU_BLOCK.format(i=i) for i in range(4)))
    _compile_stdlib(sysroot)


def _compile_stdlib(sysroot: Path) -> None:
    """Byte-compile the arm64 standard library into the sysroot, before the emulated Python first runs.

    Otherwise the emulated Python writes missing ``.pyc`` files itself, and QEMU's ``-L`` maps a path
    that does not exist in the sysroot to the host's: it would write into the host's own
    ``/usr/lib/python3.11/__pycache__``. Bytecode does not depend on the CPU, so a host 3.11 compiles it.
    """
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(f"building the board needs Python 3.11 to byte-compile its standard library, not {sys.version.split()[0]}")
    for lib in sorted((sysroot / "usr" / "lib").glob("python3*")):
        # -s/-p: the compiled code names /usr/lib/... as the emulated Python sees it; files that do not compile are test data
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(sysroot), "-p", "/", str(lib)], capture_output=True, timeout=900
        )


def _wrapper(path: Path, sysroot: Path) -> None:
    qemu = shutil.which(QEMU)
    path.parent.mkdir(parents=True)
    path.write_text(
        f"#!/bin/sh\n# arm64 CPython 3.11 under QEMU user mode (tests/remote/board.py)\n"
        f'exec {qemu} -L {sysroot} -0 "$0" {sysroot}/usr/bin/python3.11 "$@"\n'
    )
    path.chmod(0o755)


def _wheelhouse(dest: Path, log) -> None:
    log("aarch64 board: downloading aarch64 wheels")
    for specs in (pinned_wheels(), FLOOR):  # resolved separately: each set brings its own numpy
        _run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(dest), *PIP_TAGS, *specs], timeout=900
        )


def main() -> int:
    """Build (or find) the board and print where it is: ``python tests/remote/board.py``."""
    t0 = time.perf_counter()
    b = board()
    wheels = sorted(p.name for p in b.wheelhouse.iterdir())
    print(json.dumps({"python": str(b.python), "wheels": len(wheels), "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
