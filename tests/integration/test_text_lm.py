"""text-lm: a local Mixtral-style teacher with its own tiny tokenizer, on the user's JSONL files."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    from conftest import bpe_tokenizer, tiny_mixtral_config
    from transformers import MixtralForCausalLM

    from dsk_compress.tasks.code_lm import stdlib_files

    d = tmp_path_factory.mktemp("text")
    # documents: docstring-ish prose from real files, written as JSONL like a user's data
    texts = [p.read_text(errors="ignore")[:4000] for _, p in stdlib_files()[:60]]
    (d / "train.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts[:50]))
    (d / "eval.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts[50:]))
    fast = bpe_tokenizer(texts)
    model_dir = d / "teacher"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    MixtralForCausalLM(tiny_mixtral_config(vocab_size=len(fast))).save_pretrained(model_dir, safe_serialization=True)
    return d


def test_text_lm_recipe_runs_end_to_end_with_the_teachers_tokenizer(text_teacher, tmp_path):
    from dsk_compress.recipes.runner import run_recipe
    from dsk_compress.recipes.schema import RecipeSpec

    spec = RecipeSpec.model_validate(
        {
            "name": "text",
            "teacher": {"hf": str(text_teacher / "teacher")},
            "student": {"from_teacher": {"layers": [0, 2], "ffn_init": "top", "calibration_batches": 1}},
            "task": {
                "name": "text-lm",
                "train": [str(text_teacher / "train.jsonl")],
                "eval": [str(text_teacher / "eval.jsonl")],
                "tokenizer": str(text_teacher / "teacher"),
                "text_field": "body",
                "seq_len": 32,
                "eval_sequences": 8,
            },
            "stages": [{"stage": "distill", "steps": 6, "batch_size": 4}, {"stage": "export"}, {"stage": "bench", "runs": 3, "warmup": 1}],
        }
    )
    rd = run_recipe(spec, run_dir=tmp_path / "r")
    _check_bundle(rd, tmp_path)
    rep = json.loads((rd / "report.json").read_text())
    assert {v["role"] for v in rep["variants"]} == {"teacher", "student"}
    m = json.loads((rd / "distill" / "metrics.json").read_text())
    assert m["perplexity"] > 1 and 0 <= m["accuracy"] <= 100
    # the ONNX artifact is scored with the same metric code: perplexity matches torch's closely
    student = next(v for v in rep["variants"] if v["role"] == "student")
    assert abs(student["accuracy"] - m["accuracy"]) < 0.5


def _check_bundle(rd, tmp_path):
    """The rpi4 (fp32) bundle of a text-lm run: token ids above 255 kept, its own tokenizer, per-token metrics, the host's accuracy."""
    import subprocess
    import sys

    import numpy as np
    from tokenizers import Tokenizer

    from dsk_compress.export.bundle import make_bundle
    from dsk_compress.runtimes.result import parse_record

    b = make_bundle(rd, "rpi4", tmp_path / "bundle")
    windows = np.load(b / "eval_windows.npy")
    card = json.loads((b / "model_card.json").read_text())
    assert card["vocab_size"] == 300 and windows.dtype == np.uint16 and windows.max() > 255  # uint8 would wrap these ids
    assert (b / "tokenizer.json").is_file() and "tokenizers>=" in (b / "requirements.txt").read_text()
    r = subprocess.run(
        [sys.executable, "run.py", "--runs", "2", "--generate", "4", "--prompt", "def main", "--out", str(tmp_path / "res.json")],
        cwd=b,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    res = parse_record(json.loads((tmp_path / "res.json").read_text()))
    host = next(x for x in json.loads((rd / "bench" / "results.json").read_text())["records"] if x["variant"] == card["variant"])
    assert set(res.accuracy.metrics) == {"accuracy", "nll", "perplexity"}  # per-token loss and perplexity, not bits per byte
    assert res.accuracy.metrics["accuracy"] == host["accuracy"]["metrics"]["accuracy"]
    assert res.accuracy.metrics["perplexity"] == pytest.approx(host["accuracy"]["metrics"]["perplexity"], rel=1e-5)
    tok = Tokenizer.from_file(str(b / "tokenizer.json"))
    assert res.decode.text == tok.decode(res.decode.tokens) and r.stdout.startswith("def main" + res.decode.text)
    assert res.decode.prompt_tokens == len(tok.encode("def main", add_special_tokens=False).ids)


def test_text_lm_rejects_missing_field(text_teacher):
    from dsk_compress.errors import TaskError
    from dsk_compress.tasks import build_task

    with pytest.raises(TaskError, match="no field 'text'"):
        build_task(
            {
                "name": "text-lm",
                "train": [str(text_teacher / "train.jsonl")],
                "eval": [str(text_teacher / "eval.jsonl")],
                "tokenizer": str(text_teacher / "teacher"),
            }
        )
