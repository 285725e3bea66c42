"""The digits example works from a fresh clone as the docs show it, and its plan shows what will run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsk_compress.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "examples/digits/recipe.yaml"


def _tracked(path: str) -> bool:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True)
    return res.returncode == 0


def test_digits_checkpoint_ships_with_the_repository():
    """--dry-run (and the run) need examples/digits/cnn.safetensors: a fresh clone must have it, not only a machine that
    ran `python -m examples.digits.train`."""
    assert _tracked("examples/digits/cnn.safetensors")
    assert (ROOT / "examples/digits/cnn.safetensors").stat().st_size < 200_000


def test_digits_dry_run_prints_the_activations_that_will_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, ["recipe", RECIPE, "--dry-run"])
    assert res.exit_code == 0, res.output
    qat = next(line for line in res.output.splitlines() if ". qat:" in line)
    assert '"activations": "asymmetric"' in qat  # what recipes/stages/qat.py uses for your own torch model when unset
    res = CliRunner().invoke(app, ["recipe", RECIPE, "--dry-run", "--set", "stages.1.activations=symmetric"])
    assert res.exit_code == 0, res.output
    assert '"activations": "symmetric"' in next(line for line in res.output.splitlines() if ". qat:" in line)


def test_describe_plan_matches_the_config_the_stage_runs(monkeypatch):
    import dsk_compress
    from dsk_compress.recipes.runner import describe_plan, plan

    monkeypatch.chdir(ROOT)
    spec = dsk_compress.load_recipe(RECIPE)
    described = describe_plan(spec)
    for st, d in zip(plan(spec), described):
        assert d == {"index": d["index"], **st.effective_config(spec).model_dump()}
    default = dsk_compress.load_recipe("quant-prune-distill")  # a causal LM keeps the schema's symmetric default
    assert next(d for d in describe_plan(default) if d["stage"] == "qat")["activations"] == "symmetric"
