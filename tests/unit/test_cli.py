"""The ``dsk-compress`` CLI: help, listings, dry runs, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dsk_compress import __version__
from dsk_compress.cli.main import app

runner = CliRunner()
COMMANDS = ["recipes", "recipe", "devices", "report", "zoo"]
HELP_TARGETS = [[], ["recipes"], ["recipe"], ["devices"], ["report"], ["zoo"], ["zoo", "list"], ["zoo", "train"]]


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run the console script's ``main()`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "dsk_compress.cli.main", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    return lines[0]


# ---- in-process (CliRunner) -----------------------------------------------------------------------


def test_help_exits_zero_and_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0, res.output
    for cmd in COMMANDS:
        assert cmd in res.output


def test_version_prints_package_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"dsk-compress {__version__}"


def test_recipes_lists_bundled_recipe():
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0, res.output
    assert "quant-prune-distill" in res.output
    assert "Distill the code-lm-moe" in res.output


def test_devices_lists_device_profiles():
    res = runner.invoke(app, ["devices"])
    assert res.exit_code == 0, res.output
    assert "rpi5" in res.output
    assert "jetson-orin-nano" in res.output


def test_recipe_dry_run_prints_five_stages_in_order():
    res = runner.invoke(app, ["recipe", "quant-prune-distill", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "quant-prune-distill (recipe version 1, seed 0)" in res.output
    positions = [res.output.index(f"{i}. {name}:") for i, name in enumerate(["distill", "prune", "qat", "export", "bench"])]
    assert positions == sorted(positions)


def test_recipe_dry_run_shows_set_override():
    res = runner.invoke(app, ["recipe", "quant-prune-distill", "--set", "stages.1.ffn_ratio=0.4", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert '"ffn_ratio": 0.4' in res.output


def test_recipe_dry_run_creates_no_run_directory(tmp_path):
    res = runner.invoke(app, ["recipe", "quant-prune-distill", "--dry-run", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", HELP_TARGETS, ids=lambda a: " ".join(a) or "root")
def test_command_help_contains_example(args):
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.output


# ---- the real entry point in a subprocess ---------------------------------------------------------


def test_main_reports_bad_override_as_one_line_exit_2(tmp_path):
    proc = _cli("recipe", "quant-prune-distill", "--set", "stages.1.ffn_ratio=1.5", "--dry-run", cwd=tmp_path)
    line = _assert_one_line_error(proc)
    assert "stages.1.ffn_ratio" in line


def test_main_reports_unknown_recipe_with_bundled_hint_exit_2(tmp_path):
    proc = _cli("recipe", "no-such-recipe", "--dry-run", cwd=tmp_path)
    line = _assert_one_line_error(proc)
    assert "no-such-recipe" in line
    assert "hint: bundled recipes: " in line
    assert {"quant-prune-distill", "quant-prune-distill-gpu"} <= set(line.split("bundled recipes: ")[1].split(";")[0].split(", "))


def test_main_reports_missing_report_dir_exit_2(tmp_path):
    proc = _cli("report", "/nonexistent/dir", cwd=tmp_path)
    line = _assert_one_line_error(proc)
    assert "/nonexistent/dir" in line


def test_main_reports_nothing_to_resume_exit_2(tmp_path):
    out = tmp_path / "empty-runs"
    out.mkdir()
    proc = _cli("recipe", "quant-prune-distill", "--resume", "--out", str(out), cwd=tmp_path)
    line = _assert_one_line_error(proc)
    assert "no run of 'quant-prune-distill' to resume" in line
    assert list(out.iterdir()) == []


def test_main_reports_usage_error_without_traceback(tmp_path):
    proc = _cli("recipe", "--no-such-option", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "No such option" in proc.stderr


def test_main_without_arguments_shows_help_without_traceback(tmp_path):
    proc = _cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "recipe" in proc.stdout + proc.stderr
