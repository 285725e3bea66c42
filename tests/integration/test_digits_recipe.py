"""examples/digits end to end: train the base CNN, then the shipped recipe (prune -> qat -> export -> bench) at small step counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import os
    import sys

    import dsk_compress

    d = tmp_path_factory.mktemp("digits")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)  # the recipe names examples.* relative to the repository root
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    try:
        sys.path.insert(0, str(REPO))
        from examples.digits.train import train_base

        ck = d / "cnn.safetensors"
        base = train_base(ck, steps=150)
        spec = dsk_compress.load_recipe(
            str(REPO / "examples" / "digits" / "recipe.yaml"),
            [
                f"teacher.checkpoint={ck}",
                f"student.checkpoint={ck}",
                "stages.0.steps=20",
                "stages.1.steps=30",
                "stages.3.runs=10",
                "stages.3.warmup=2",
            ],
        )
        rd = dsk_compress.run_recipe(spec, out=d / "runs")
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return rd, base


def test_digits_report_has_every_variant_measured_in_onnxruntime(digits_run):
    rd, base = digits_run
    rep = json.loads((rd / "report.json").read_text())
    by = {v["name"]: v for v in rep["variants"]}
    assert {n: v["role"] for n, v in by.items()} == {
        "teacher": "teacher",
        "student-prune": "student",
        "pruned-oneshot": "pruned-oneshot",
        "ptq-dynamic": "ptq-dynamic",
        "ptq-static": "ptq-static",
        "final": "final",
    }
    for v in rep["variants"]:
        assert v["runtime"] == "onnxruntime-cpu" and v["metrics"]["eval_samples"] == 359
        assert 0 < v["latency_ms"]["p50"] <= v["latency_ms"]["p99"]
    assert by["teacher"]["accuracy"] == pytest.approx(base["accuracy"], abs=0.01)  # the exported base model scores as in torch
    assert by["teacher"]["accuracy"] > 95
    # chance is 10%; the INT8 model stays within a few points of its fp32 student
    assert by["final"]["precision"] == "int8" and by["final"]["accuracy"] > 90
    assert by["final"]["accuracy"] >= by["student-prune"]["accuracy"] - 3
    assert by["final"]["size_bytes"] < 0.6 * by["student-prune"]["size_bytes"]
    assert rep["summary"]["recommended"] is not None
    assert "digits (359 validation samples, input 1x8x8)" in (rd / "report.md").read_text()


def test_digits_prune_counts_macs_and_progressive_schedule(digits_run):
    rd, _ = digits_run
    m = json.loads((rd / "prune" / "metrics.json").read_text())
    assert m["structure_before"]["conv_channels"] == {"features.0": 16, "features.3": 32, "features.6": 64}
    assert m["structure_after"]["conv_channels"] == {"features.0": 8, "features.3": 16, "features.6": 32}
    assert [it["structure"]["conv_channels"] for it in m["iterations"]] == [
        {"features.0": 8, "features.3": 24, "features.6": 48},
        {"features.0": 8, "features.3": 16, "features.6": 32},
    ]
    assert (m["macs_before"], m["macs_after"], m["mac_reduction"]) == (159_232, 42_752, 0.7315)
    assert m["baseline_oneshot"]["iterations"][0]["train"]["steps"] == 40  # same total fine-tune budget


def test_digits_int8_export_is_all_integer_convs_with_high_sqnr(digits_run):
    rd, _ = digits_run
    final = json.loads((rd / "export" / "metrics.json").read_text())["artifacts"]["final"]
    assert final["quantized_convs"] == final["integer_convs"] == 3
    assert final["integer_ops"] == final["quantized_layers"] == 4
    assert final["sqnr_db_vs_fake_quant"] >= 35
    q = json.loads((rd / "qat" / "metrics.json").read_text())
    assert q["bn_folded"] == ["features.1", "features.4", "features.7"]
