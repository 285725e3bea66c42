"""``dsk-compress bench RUN --host ...`` end to end on the emulated aarch64 board (arm64 Python 3.11 under QEMU, over a
real sshd on 127.0.0.1): the bundle is exported, copied, its venv installed offline, run.py measures it on the board,
and the results come back into the run's report as that device's rows, labelled emulated.

Accuracy is what emulation can prove (timings under QEMU are the emulator's): the fp32 bundle scores exactly the
host's accuracy, the int8 one within 0.05 points (ONNX Runtime's int8 kernels differ between x86 and ARM), and a
text-lm run with a 300-token vocabulary (ids above 255 in its evaluation windows) scores exactly the host's. The
oldest onnxruntime the bundles allow (1.18.1, from the board's wheelhouse) loads and scores the int8 bundle on the board.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.remote

STAGES = [
    {"stage": "distill", "steps": 3, "batch_size": 4, "lr": 3e-3},
    {"stage": "qat", "steps": 4, "batch_size": 4, "observer_steps": 2},
    {"stage": "export", "ptq_baselines": False},  # with decoder graphs: the floor test decodes with the fused one
    {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
]


def _run(d: Path, name: str, teacher: dict, task: dict, stages: list[dict]) -> Path:
    from dsk_compress.recipes.runner import run_recipe
    from dsk_compress.recipes.schema import RecipeSpec

    spec = RecipeSpec.model_validate(
        {
            "name": name,
            "teacher": teacher,
            "student": {"from_teacher": {"layers": [0], "ffn_init": "top", "calibration_batches": 1}},
            "task": task,
            "stages": stages,
        }
    )
    return run_recipe(spec, run_dir=d / name)


@pytest.fixture(scope="session")
def code_run(tmp_path_factory) -> Path:
    """A tiny code-lm run through qat, export and bench: an fp32 student (rpi4's bundle) and an int8 one (rpi5's).
    64 windows of 64 bytes: 4,032 scored tokens, so 0.05 points is two predictions."""
    from conftest import tiny_llama

    d = tmp_path_factory.mktemp("code-run")
    tiny_llama().save_pretrained(d / "teacher", safe_serialization=True)
    return _run(d, "code", {"hf": str(d / "teacher")}, {"name": "code-lm", "seq_len": 64, "eval_sequences": 64}, STAGES)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory) -> Path:
    """A tiny text-lm run whose teacher has its own 300-token BPE tokenizer (as tests/integration/test_text_lm.py)."""
    from conftest import bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsk_compress.tasks.code_lm import stdlib_files

    d = tmp_path_factory.mktemp("text-run")
    texts = [p.read_text(errors="ignore")[:4000] for _, p in stdlib_files()[:40]]
    (d / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[:32]))
    (d / "eval.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[32:]))
    fast = bpe_tokenizer(texts)
    fast.save_pretrained(d / "teacher")
    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(d / "teacher", safe_serialization=True)
    task = {
        "name": "text-lm",
        "train": [str(d / "train.jsonl")],
        "eval": [str(d / "eval.jsonl")],
        "tokenizer": str(d / "teacher"),
        "seq_len": 48,
        "eval_sequences": 32,
    }
    return _run(d, "text", {"hf": str(d / "teacher")}, task, [STAGES[0], STAGES[2], STAGES[3]])


def _bench(device, run: Path, profile: str, *extra: str):
    """``dsk-compress bench RUN --device PROFILE --host ...`` against the board, through the CLI's entry point."""
    from dsk_compress.cli.main import app

    args = [
        "bench",
        str(run),
        "--device",
        profile,
        "--host",
        device.host,
        "--identity",
        str(device.identity),
        "--known-hosts",
        str(device.known_hosts),
        "--python",
        device.python,
        "--wheelhouse",
        str(device.wheelhouse),
        "--remote-dir",
        str(device.root),
        "--runs",
        "1",
        *extra,
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return res.output


def _host_record(run: Path, variant: str) -> dict:
    return next(r for r in json.loads((run / "bench" / "results.json").read_text())["records"] if r["variant"] == variant)


def _device_record(run: Path, device: str) -> dict:
    (rec,) = json.loads((run / "devices" / device / "results.json").read_text())["records"]
    return rec


def test_bench_over_ssh_fp32_equals_the_host_exactly_and_is_labelled_emulated(emulated_device, code_run):
    out = _bench(emulated_device, code_run, "rpi4")
    assert "aarch64 Python 3.11" in out and "emulated" in out
    rec, card = _device_record(code_run, "rpi4"), json.loads((code_run / "bundles" / "rpi4" / "model_card.json").read_text())
    host = _host_record(code_run, card["variant"])
    assert (rec["variant"], rec["precision"]) == ("student-distill", "fp32")
    assert rec["accuracy"]["metrics"]["accuracy"] == host["accuracy"]["metrics"]["accuracy"]  # same windows, same model: exactly
    assert rec["accuracy"]["metrics"]["bits_per_byte"] == pytest.approx(host["accuracy"]["metrics"]["bits_per_byte"], abs=1e-5)
    p = rec["provenance"]
    assert (p["measurement"], p["location"], p["machine"], p["tool"], p["ssh_host"]) == (
        "emulated",
        "device",
        "aarch64",
        "run.py",
        emulated_device.host,
    )
    assert p["cpu"] == "ARM implementer 0x41 part 0xd08" and p["device_profile"] == "rpi4" and p["source_run"] == code_run.name
    assert [b["batch_size"] for b in rec["timing"]["batches"]] == [1]  # emulated: no throughput batches (the emulator's timings)
    report = json.loads((code_run / "report.json").read_text())
    (section,) = report["devices"]
    assert (section["name"], section["measurement"]) == ("rpi4", "emulated")
    (row,) = section["variants"]
    assert (row["measured_on"], row["measurement"], row["accuracy_delta_vs_host"]) == ("rpi4 (emulated)", "emulated", 0)
    assert all(v["device"] == "host" and v["measurement"] == "measured" for v in report["variants"])  # host rows unchanged
    assert "## Device: rpi4 (emulated)" in (code_run / "report.md").read_text()
    raw = code_run / "devices" / "rpi4" / "raw" / "student-distill"
    assert {f.name for f in raw.iterdir()} == {"results.json", "run.log", "provenance.json"}


def test_bench_over_ssh_int8_within_0_05_points_and_earlier_devices_kept(emulated_device, code_run):
    _bench(emulated_device, code_run, "rpi5")
    rec = _device_record(code_run, "rpi5")
    host = _host_record(code_run, "final")
    assert rec["precision"] == "int8" and rec["provenance"]["measurement"] == "emulated"
    drift = abs(rec["accuracy"]["metrics"]["accuracy"] - host["accuracy"]["metrics"]["accuracy"])
    assert drift <= 0.05, (rec["accuracy"], host["accuracy"])
    names = [d["name"] for d in json.loads((code_run / "report.json").read_text())["devices"]]
    assert "rpi5" in names and len(names) == len(set(names))  # rpi4 from the test above (when it ran) kept beside it
    assert (code_run / "pareto-rpi5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_over_ssh_text_lm_with_300_tokens_equals_the_host(emulated_device, text_run):
    _bench(emulated_device, text_run, "rpi4")
    bundle = text_run / "bundles" / "rpi4"
    windows = np.load(bundle / "eval_windows.npy")
    assert windows.dtype == np.uint16 and windows.max() > 255 and (bundle / "tokenizer.json").is_file()
    rec = _device_record(text_run, "rpi4")
    host = _host_record(text_run, rec["variant"])
    assert set(rec["accuracy"]["metrics"]) == {"accuracy", "nll", "perplexity"} and rec["accuracy"]["task"] == "text-lm"
    assert rec["accuracy"]["metrics"]["accuracy"] == host["accuracy"]["metrics"]["accuracy"]
    assert rec["accuracy"]["metrics"]["perplexity"] == pytest.approx(host["accuracy"]["metrics"]["perplexity"], rel=1e-5)
    assert rec["provenance"]["measurement"] == "emulated"


def test_oldest_allowed_onnxruntime_runs_the_int8_bundle_on_the_board(emulated_device, code_run, tmp_path):
    """The floor of requirements.txt (onnxruntime 1.18: the optimized graphs' ai.onnx.ml opset 5) loads and scores the int8
    bundle on arm64, within 0.05 points of the host's onnxruntime."""
    from dsk_compress.export.bundle import make_bundle

    from .board import FLOOR

    b = make_bundle(code_run, "rpi5", tmp_path / "rpi5")
    floors = dict(line.split(">=") for line in (b / "requirements.txt").read_text().split() if ">=" in line)
    pins = dict(spec.split("==") for spec in FLOOR)
    assert floors["onnxruntime"] == ".".join(pins["onnxruntime"].split(".")[:2])  # the floor is what the board installs here
    (b / "requirements.txt").write_text("\n".join(FLOOR) + "\n")
    with emulated_device.remote(command_timeout=1800) as dev:
        out = dev.run_bundle(
            b,
            out_dir=tmp_path / "out",
            run_args=["--runs", "1", "--batches", "1", "--generate", "8"],
            remote_root=str(emulated_device.root / "bundles" / "floor-rpi5"),
            timeout=1800,
            **emulated_device.bundle_kwargs(),
        )
    assert out["provenance"]["packages"]["onnxruntime"] == pins["onnxruntime"]
    got, host = out["results"]["accuracy"]["metrics"]["accuracy"], _host_record(code_run, "final")["accuracy"]["metrics"]["accuracy"]
    assert abs(got - host) <= 0.05, (got, host)
    # the fused int8 decoder (GroupQueryAttention with rotary on one shared KV buffer, MatMulIntegerToFloat) decodes on the
    # floor's arm64 kernels with IO binding to the host's greedy tokens
    from dsk_compress.runtimes.decoder import FusedDecoderSession

    dec = out["results"]["decode"]
    prompt = np.load(b / "eval_windows.npy")[0][: json.loads((b / "model_card.json").read_text())["seq_len"] // 2]
    assert dec["artifact"] == "model.fused.onnx" and dec["decode_tokens_per_s"] > 0
    assert dec["tokens"] == FusedDecoderSession(b / "model.fused.onnx").greedy(prompt, 9)[0].tolist()


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """The smallest run with two exported variants (teacher and an fp32 student: rpi4's bundle ships the student), 8 windows
    of 32 bytes, no decoder graphs: the emulator runs each variant in seconds."""
    from conftest import tiny_llama_recipe

    from dsk_compress import run_recipe

    d = tmp_path_factory.mktemp("small-run")
    recipe = tiny_llama_recipe(
        d,
        "small",
        [
            {"stage": "distill", "steps": 2, "batch_size": 4, "lr": 3e-3},
            {"stage": "export", "precisions": ["fp32"], "ptq_baselines": False, "kv_cache": False},
            {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
        ],
    )
    return run_recipe(str(recipe), out=d / "runs")


def test_bench_over_ssh_variants_all_measures_every_variant_in_one_session(emulated_device, small_run):
    out = _bench(emulated_device, small_run, "rpi4", "--variants", "all")
    host_rows = [v["name"] for v in json.loads((small_run / "report.json").read_text())["variants"] if " [" not in v["name"]]
    assert host_rows == ["teacher", "student-distill"]
    recs = json.loads((small_run / "devices" / "rpi4" / "results.json").read_text())["records"]
    assert [r["variant"] for r in recs] == host_rows
    for r in recs:  # fp32 graphs, the same windows: the host's accuracy exactly, on the board, labelled emulated
        assert r["accuracy"]["metrics"]["accuracy"] == _host_record(small_run, r["variant"])["accuracy"]["metrics"]["accuracy"]
        p = r["provenance"]
        assert (p["measurement"], p["machine"], p["ssh_host"], p["device_profile"]) == ("emulated", "aarch64", emulated_device.host, "rpi4")
    (section,) = [d for d in json.loads((small_run / "report.json").read_text())["devices"] if d["name"] == "rpi4"]
    assert [v["name"] for v in section["variants"]] == host_rows and set(section["pareto"]) <= set(host_rows) and section["pareto"]
    assert "2 result(s)" in out and (small_run / "pareto-rpi4.png").is_file()
    # one session: one bundle copy (the shipped graph at its top, the teacher under variants/) and one run.log
    remote = emulated_device.root / "bundles" / f"{small_run.name}-rpi4+variants"
    assert (remote / "model.onnx").is_file() and (remote / "variants" / "teacher" / "model.onnx").is_file()
    log = (small_run / "devices" / "rpi4" / "raw" / "rpi4+variants" / "run.log").read_text()
    assert "variant teacher" in log and "variant student-distill" in log
    # the profile's threads, capped at the cores the emulator has (more would spin against each other)
    from dsk_compress.devices import load_device

    cores, want = os.cpu_count() or 1, load_device("rpi4").threads
    assert {r["runtime"]["threads"] for r in recs} == {min(cores, want)}
    assert (f"emulated on {cores} core(s): {cores} thread(s), not the profile's {want}" in " ".join(out.split())) == (cores < want)
    # and the user saw each variant start as it did, not only at the end
    assert f"{emulated_device.host}: variant teacher" in out and f"{emulated_device.host}: variant student-distill" in out, out
