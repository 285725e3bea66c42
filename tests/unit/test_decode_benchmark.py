"""benchmarks/decode.py's arithmetic: every ratio compares two variants at one thread count (no stack's best thread count
against another's), by tokens/s and step p50; an older decode.json is rebuilt from its stored rounds the same way."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_bench", ROOT / "benchmarks" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rounds(**per_variant):
    """``{variant: {threads: [per-round figures]}}`` from ``variant=(figures at 1 thread, figures at 2)``."""
    return {n.replace("_", "-").replace("-at-", "@"): {1: list(a), 2: list(b)} for n, (a, b) in per_variant.items()}


def test_ratios_compare_variants_at_the_same_thread_count_only(bench):
    # genai is fastest at 1 thread, ours at 2: the old headline compared ours@2 with genai@1
    tok = _rounds(
        fused_int8=([100, 110, 90], [150, 160, 140]),
        genai_int4=([120, 120, 120], [60, 60, 60]),
        genai_fp32=([80, 80, 80], [50, 50, 50]),
        fused_int8_at_genai=([96, 96, 96], [144, 144, 144]),
    )
    p50 = _rounds(
        fused_int8=([10.0, 9.0, 11.0], [6.0, 6.5, 7.0]),
        genai_int4=([8.0, 8.0, 8.0], [16.0, 16.0, 16.0]),
        genai_fp32=([12.0, 12.0, 12.0], [20.0, 20.0, 20.0]),
        fused_int8_at_genai=([10.5, 10.5, 10.5], [7.0, 7.0, 7.0]),
    )
    out = bench.summarize(tok, p50, {}, [1, 2], ["genai-int4", "genai-fp32"])
    one, two = out["ratios_at"]["1"], out["ratios_at"]["2"]
    assert set(out["ratios_at"]) == {"1", "2"}  # no "best" entry mixing thread counts
    assert one["genai_best"] == "genai-int4" and two["genai_best"] == "genai-int4"
    assert one["tokens_per_s"]["final_vs_onnxruntime_genai"] == round(100 / 120, 3)  # medians: 100 vs 120
    assert one["step_p50"]["final_vs_onnxruntime_genai"] == round(8.0 / 10.0, 3)  # b / a: > 1 means ours is faster
    assert two["tokens_per_s"]["final_vs_onnxruntime_genai"] == round(150 / 60, 3)
    assert one["tokens_per_s"]["final_in_genai_loop_vs_onnxruntime_genai"] == round(96 / 120, 3)
    assert two["step_p50"]["fused-int8_vs_fused-int8@genai"] == round(7.0 / 6.5, 3)  # the loops alone
    assert out["headline"]["final_vs_onnxruntime_genai"] == {
        "1": {"step_p50": 0.8, "tokens_per_s": 0.833},
        "2": {"step_p50": 2.462, "tokens_per_s": 2.5},
    }
    assert "final_int4_vs_onnxruntime_genai_int4" not in out["headline"]  # not timed: not reported
    assert out["best_threads"] == {"fused-int8": 2, "genai-int4": 1, "genai-fp32": 1, "fused-int8@genai": 2}


def test_resummarize_drops_mixed_thread_ratios_and_keeps_the_rounds(bench, tmp_path):
    v3 = json.loads((ROOT / "benchmarks" / "results" / "decode.json").read_text())
    old = {k: v for k, v in v3.items() if k not in ("version", "resummarized")}
    old.update(version=3, ratios={"fused-fp32_vs_genai-fp32": 1.107}, ratios_from_step_p50={}, prefill_speedup={}, genai_best="genai-int4")
    new = bench.resummarize(old)
    assert new["version"] == 4 and "resummarized" in new
    assert not {"ratios", "ratios_from_step_p50", "prefill_speedup", "genai_best"} & set(new) and set(new["ratios_at"]) == {"1", "2"}
    assert new["decode_tokens_per_s_rounds"] == old["decode_tokens_per_s_rounds"]
    for t in ("1", "2"):  # every ratio is the quotient of the two variants' medians at that thread count
        med = new["decode_tokens_per_s_median"]
        assert new["ratios_at"][t]["tokens_per_s"]["fused-fp32_vs_genai-fp32"] == round(med["fused-fp32"][t] / med["genai-fp32"][t], 3)
