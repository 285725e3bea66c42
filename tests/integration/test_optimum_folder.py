"""``dsk-compress export RUN --format genai | optimum`` on a finished tiny run: onnxruntime-genai's loop and Hugging Face Optimum's
``ORTModelForCausalLM.generate`` load the folders and greedy-generate the 32 tokens the run's deploy bundle's ``run.py --generate``
does (Optimum in a venv of its own: optimum-onnx 0.1.0 needs transformers < 4.58; :mod:`optimum_venv`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error, run_main, tiny_llama_recipe

NEW = 32
PROMPT = "def area(r):\n    return "

OPTIMUM_GENERATE = """
import json, sys
import transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(folder)
tok = AutoTokenizer.from_pretrained(folder)
ids = tok(prompt, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
print(json.dumps({"prompt_ids": ids["input_ids"][0].tolist(), "tokens": out[0, ids["input_ids"].shape[1]:].tolist(),
                  "inputs": list(model.input_names), "transformers": transformers.__version__}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny finished run with a QAT student, fused and KV decoder graphs and a report (about a minute). Learning rates so
    small that the students stay near their random start: their greedy tokens vary, so equal tokens mean something."""
    from dsk_compress import run_recipe

    d = tmp_path_factory.mktemp("runtime-folders")
    recipe = tiny_llama_recipe(
        d,
        "tiny-folders",
        [
            {"stage": "distill", "steps": 2, "batch_size": 4, "lr": 1e-6},
            {"stage": "qat", "steps": 2, "batch_size": 4, "lr": 1e-6},
            {"stage": "export", "precisions": ["fp32", "int8"], "ptq_baselines": False, "kv_cache": True, "teacher": "skip"},
            {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
        ],
    )
    return run_recipe(str(recipe), out=d / "runs")


@pytest.fixture(scope="module")
def run_py_tokens(run) -> list[int]:
    """The first 32 greedy tokens of the run's rpi5 bundle (the QAT student, fused int8 graph): ``run.py --generate``."""
    from dsk_compress.export.bundle import make_bundle

    bundle = make_bundle(run, "rpi5")
    out = bundle / "gen.json"
    proc = subprocess.run(
        [sys.executable, "run.py", "--generate", str(NEW), "--prompt", PROMPT, "--out", str(out)],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dec = json.loads(out.read_text())["decode"]
    assert dec["artifact"] == "model.fused.onnx"
    tokens = dec["tokens"][:NEW]  # run.py's first token comes from the prompt's logits, then one per step
    assert len(set(tokens)) > 3
    return tokens


@pytest.fixture(scope="session")
def optimum_python() -> Path:
    from optimum_venv import Unavailable, optimum_python

    try:
        return optimum_python()
    except Unavailable as e:
        pytest.skip(str(e))


def _genai_tokens(folder: Path, prompt: str | list[int]) -> tuple[list[int], list[int]]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    ids = og.Tokenizer(model).encode(prompt) if isinstance(prompt, str) else np.asarray(prompt, np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + NEW, min_length=len(ids) + NEW)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in ids], [int(t) for t in gen.get_sequence(0)[len(ids) :]]


def _optimum_tokens(py: Path, folder: Path) -> dict:
    proc = subprocess.run([str(py), "-c", OPTIMUM_GENERATE, str(folder), PROMPT, str(NEW)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_genai_folder_of_a_run_generates_the_bundles_run_py_tokens(run, run_py_tokens, capsys):
    pytest.importorskip("onnxruntime_genai")
    code, out, err = run_main(["export", str(run), "--format", "genai"], capsys)
    assert code == 0, err
    folder = run / "bundles" / "genai-final"
    assert out.startswith("genai folder:") and str(folder) in out.replace("\n", "")  # rich folds long lines
    prompt_ids, tokens = _genai_tokens(folder, PROMPT)
    assert prompt_ids == list(PROMPT.encode("utf-8"))  # the byte-level tokenizer: one id per UTF-8 byte
    assert tokens == run_py_tokens


def test_optimum_folder_of_a_run_generates_the_bundles_run_py_tokens(run, run_py_tokens, optimum_python, capsys):
    code, _, err = run_main(["export", str(run), "--format", "optimum"], capsys)
    assert code == 0, err
    folder = run / "bundles" / "optimum-final"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".dsk-bundle.json",
        "README.md",
        "config.json",
        "generation_config.json",
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    res = _optimum_tokens(optimum_python, folder)
    assert res["transformers"].startswith("4.57")
    assert res["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert res["prompt_ids"] == list(PROMPT.encode("utf-8"))
    assert res["tokens"] == run_py_tokens


@pytest.mark.parametrize("graph", ["fused", "kv"])
def test_optimum_and_genai_folders_of_the_float_student_match_our_decoders(run, optimum_python, tmp_path, graph):
    """The fp32 student as its fused graph and (a student the fused builder refuses ships this one) its plain KV graph."""
    from dataclasses import replace

    from dsk_compress.export.genai import decoder_shape, write_genai
    from dsk_compress.export.optimum import write_optimum
    from dsk_compress.export.runtime_folders import decoder_source
    from dsk_compress.runtimes.decoder import FusedDecoderSession, KVCacheSession

    src = decoder_source(run, "student-distill")
    if graph == "kv":
        kv = run / "export" / "student-distill.kv.onnx"
        src = replace(src, kind="kv", graph=kv, shape={**decoder_shape(kv), "heads": src.shape["heads"]})
    ours = (FusedDecoderSession if graph == "fused" else KVCacheSession)(src.graph).greedy(np.frombuffer(PROMPT.encode(), np.uint8), NEW)[0]
    (tmp_path / "optimum").mkdir()
    write_optimum(src, tmp_path / "optimum")
    res = _optimum_tokens(optimum_python, tmp_path / "optimum")
    assert res["tokens"] == ours.tolist()
    assert ("position_ids" in res["inputs"]) is (graph == "fused")  # the KV graph derives positions from the mask
    (tmp_path / "genai").mkdir()
    write_genai(src, tmp_path / "genai")
    assert _genai_tokens(tmp_path / "genai", PROMPT)[1] == ours.tolist()


def test_runtime_folders_follow_the_bundles_out_rules(run, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    line = one_line_error(*run_main(["export", str(run), "--format", "genai", "--out", str(foreign)], capsys)[::2])
    assert "is not empty and was not written by dsk-compress export" in line and (foreign / "notes.txt").read_text() == "keep"
    line = one_line_error(*run_main(["export", str(run), "--format", "optimum", "--out", str(run / "export")], capsys)[::2])
    assert "inside the run" in line
    line = one_line_error(*run_main(["export", str(run), "--format", "genai", "--device", "rpi5"], capsys)[::2])
    assert "--device goes with --format bundle" in line
    line = one_line_error(*run_main(["export", str(run), "--format", "genai", "--variant", "teacher"], capsys)[::2])
    assert "no variant 'teacher'" in line
    out = tmp_path / "g"
    for _ in range(2):  # an earlier export's folder is replaced in place; a file the user added stays
        assert run_main(["export", str(run), "-f", "genai", "--variant", "student-distill", "--out", str(out)], capsys)[0] == 0
        (out / "mine.txt").write_text("x")
    assert (out / "mine.txt").is_file() and json.loads((out / ".dsk-bundle.json").read_text())["variant"] == "student-distill"
