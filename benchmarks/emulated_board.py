"""Bench a run on the emulated arm64 board of the remote tests, over SSH, as a user benches a real Pi.

Starts the loopback sshd of ``tests/remote/sshd.py`` and the cached emulated board of ``tests/remote/board.py``
(Debian bookworm arm64 Python under QEMU user mode, an offline aarch64 wheelhouse; built on first use), then runs
``dsk-compress bench RUN --device PROFILE --host ...`` against it with any further arguments, and stops the sshd.
The results land in ``RUN/devices/PROFILE/`` and the run's report, labelled ``emulated``; accuracy on the board is
the artifact's on arm64 kernels, latency is QEMU's, not a Pi's.

    .venv/bin/python benchmarks/emulated_board.py runs/quant-prune-distill-<time> --device rpi5 -- --variants all

Needs openssh-server, qemu-user-static and debian-archive-keyring (what ``.ci/run`` installs). Slow: each variant
of the default run takes minutes under QEMU, the teacher most; the device's folder is ``--remote-dir`` (default a
folder beside the run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--device", default="rpi5", help="device profile (an arm64 one)")
    ap.add_argument("--remote-dir", type=Path, help="the board's working folder (default RUN/../emulated-board)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.bench_args = argv[cut + 1 :]  # after --: more `dsk-compress bench` arguments, e.g. --variants all
    sys.path.insert(0, str(ROOT / "tests" / "remote"))
    import board as board_mod
    import sshd

    missing = sshd.missing_tools() + board_mod.missing_tools()
    if missing:
        raise SystemExit(f"needs {', '.join(missing)} (Debian: openssh-server qemu-user-static debian-archive-keyring)")
    work = (args.remote_dir or args.run_dir.resolve().parent / "emulated-board").resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "sshd").mkdir(exist_ok=True)
    srv = sshd.SshServer(work / "sshd").start()
    try:
        b = board_mod.board(log=lambda m: print(m, flush=True))
        known = work / "known_hosts"
        known.write_text(srv.host_key_line)
        cmd = [
            sys.executable, "-m", "dsk_compress.cli.main", "bench", str(args.run_dir), "--device", args.device,
            "--host", srv.host, "--identity", str(srv.client_key), "--known-hosts", str(known),
            "--python", str(b.python), "--wheelhouse", str(b.wheelhouse), "--remote-dir", str(work / "device"),
            *args.bench_args,
        ]  # fmt: skip
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"bench exited {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        srv.stop()
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
