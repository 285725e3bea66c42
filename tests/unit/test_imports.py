"""Importing the package and running ``--help`` must not pull in heavy or optional backends."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnxruntime", "tensorrt", "torch_pruning")

_CHECK = f"""
import sys
heavy = {HEAVY!r}
print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))
"""


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_package_does_not_import_heavy_backends():
    proc = _python("import dsk_compress, dsk_compress.runtimes, dsk_compress.recipes, dsk_compress.cli.main\n" + _CHECK)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_cli_help_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "dsk_compress.cli.main", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recipe" in proc.stdout


def test_cli_help_does_not_import_onnxruntime():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dsk_compress.cli.main", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "dsk_compress" in proc.stderr  # importtime output is there
    for name in HEAVY:
        assert name not in proc.stderr


def test_cli_help_in_process_does_not_import_heavy_backends():
    code = (
        "from dsk_compress.cli.main import app\ntry:\n    app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n" + _CHECK
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_dry_run_does_not_import_heavy_backends():
    code = "from dsk_compress.cli.main import app\napp(['recipe', 'quant-prune-distill', '--dry-run'], standalone_mode=False)\n" + _CHECK
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
