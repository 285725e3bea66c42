"""Model sources: local HF directories load; missing or corrupt ones give one clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama

from dsk_compress.errors import ModelSourceError
from dsk_compress.models.source import load_hf_dir, load_model_source, save_hf_dir


def test_hf_dir_round_trips_exactly(tmp_path):
    m = tiny_llama()
    save_hf_dir(m, tmp_path / "m")
    r = load_model_source({"hf": str(tmp_path / "m")})
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, r(input_ids=x).logits)


def test_missing_hf_dir_is_a_model_source_error(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json missing"):
        load_hf_dir(tmp_path / "nothing")


def test_corrupt_weights_are_a_model_source_error(tmp_path):
    save_hf_dir(tiny_llama(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelSourceError, match="cannot load the model"):
        load_hf_dir(tmp_path / "m")


def test_unknown_zoo_model_lists_valid_names():
    with pytest.raises(ModelSourceError, match="code-lm-moe"):
        load_model_source({"zoo": "nope"})


def test_cli_corrupt_teacher_exits_2_without_traceback(tmp_path):
    save_hf_dir(tiny_llama(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsk_compress.cli.main",
            "recipe",
            "quant-prune-distill",
            "--out",
            str(tmp_path / "runs"),
            "--set",
            "teacher.zoo=null",
            "--set",
            f"teacher.hf={tmp_path / 'm'}",
            "--set",
            "student.from_teacher.layers=[0, 1]",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot load the model")
