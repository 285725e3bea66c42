"""The line a run prints before each stage: what it does, its budget, and the time of the last comparable run."""

from __future__ import annotations

import json
import os

import dsk_compress
from dsk_compress.recipes.headers import format_seconds, last_comparable, stage_header
from dsk_compress.recipes.runner import plan


def _manifest(d, recipe: dict, seconds: float, status: str = "done", mtime: float | None = None):
    d.mkdir(parents=True)
    stages = [{"index": i, "stage": s["stage"], "status": status, "seconds": seconds} for i, s in enumerate(recipe["stages"])]
    (d / "manifest.json").write_text(json.dumps({"recipe": recipe, "stages": stages}))
    if mtime is not None:
        os.utime(d / "manifest.json", (mtime, mtime))


def test_last_comparable_takes_the_newest_finished_run_with_the_same_stage_config(tmp_path):
    spec = dsk_compress.load_recipe("quant-prune-distill")
    resolved = spec.model_dump(mode="json")
    other = json.loads(json.dumps(resolved))
    other["stages"][1]["ffn_ratio"] = 0.3  # prune differs, distill does not
    _manifest(tmp_path / "a", resolved, 100.0, mtime=1_000)
    _manifest(tmp_path / "b", resolved, 90.0, mtime=2_000)  # newest with the same config
    _manifest(tmp_path / "c", other, 10.0, mtime=3_000)
    _manifest(tmp_path / "d", resolved, 5.0, status="failed", mtime=4_000)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text("{not json")
    mine = tmp_path / "mine"
    _manifest(mine, resolved, 1.0, mtime=5_000)  # the run itself never counts
    assert last_comparable(mine, resolved, 0) == (10.0, tmp_path / "c")  # distill is the same in c
    assert last_comparable(mine, resolved, 1) == (90.0, tmp_path / "b")
    header = stage_header(1, 5, plan(spec)[1], spec, mine)
    assert header.startswith("[2/5] prune: Structured pruning") and "100 steps x batch 16" in header
    assert header.endswith(f"Last comparable run: 1 min 30 s ({tmp_path / 'b'})")


def test_no_comparable_run_says_nothing_about_time(tmp_path):
    spec = dsk_compress.load_recipe("quant-prune-distill")
    header = stage_header(4, 5, plan(spec)[4], spec, tmp_path / "runs" / "x")
    assert header == (
        "[5/5] bench: Measure every exported variant on this host: accuracy of the artifact in its runtime, "
        "latency, throughput, memory; 30 timed runs per variant."
    )


def test_qat_header_gives_each_precisions_steps(tmp_path):
    spec = dsk_compress.load_recipe("quant-prune-distill")  # precisions [int8, int4], steps 100, int4.steps 200
    assert "; int8 100 steps + int4 200 steps x batch 16." in stage_header(2, 5, plan(spec)[2], spec, tmp_path / "x")
    spec = dsk_compress.load_recipe("quant-prune-distill", ["stages.2.precisions=[int8]"])
    assert "; int8 100 steps x batch 16." in stage_header(2, 5, plan(spec)[2], spec, tmp_path / "x")


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 49, 396, 3725)] == ["0 s", "49 s", "6 min 36 s", "1 h 02 min"]
