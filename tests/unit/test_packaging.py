"""``pip install .`` builds without a setuptools warning, ships the license and the package data, and the ruff
configuration the CI runs is there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_license_is_an_spdx_string_with_its_file():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_ruff_is_configured_and_pinned():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ruff = meta["tool"]["ruff"]
    assert ruff["line-length"] and {"E", "F", "I"} <= set(ruff["lint"]["select"])
    assert any(d.startswith("ruff") for d in meta["project"]["optional-dependencies"]["dev"])
    assert any(line.startswith("ruff==") for line in (ROOT / "constraints.txt").read_text().splitlines())


def test_wheel_builds_without_setuptools_warnings(tmp_path):
    import setuptools
    from packaging.version import Version

    if Version(setuptools.__version__) < Version("77"):
        pytest.skip(f"setuptools {setuptools.__version__} here; the build needs >= 77 (pip's isolated build gets it)")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for f in filter(None, files):  # the files a fresh clone has, nothing built here
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # its "byte-compiling is disabled" note
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "-v"],
        cwd=src,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = res.stdout + res.stderr
    warnings = [ln for ln in log.splitlines() if "warn" in ln.lower() and "Location 'file:" not in ln]  # pip's own index notes
    assert not warnings, "\n".join(warnings)
    (wheel,) = (tmp_path / "dist").glob("dsk_compress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "dsk_compress/models/zoo/code-lm-moe/model.safetensors" in names and "dsk_compress/recipes/quant-prune-distill.yaml" in names
    assert "dsk_compress/devices/rpi5.yaml" in names
