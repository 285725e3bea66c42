"""KV-cache ONNX export: token-by-token greedy decode in ONNX Runtime equals torch, fp32 and INT8 Q/DQ."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import qat_llama, tiny_llama, tiny_mixtral_config

STEP_ATOL = 1e-4  # fp32 decode-step logits vs torch (seen: 1.8e-7)
NEW = 12
PROMPT = np.random.default_rng(0).integers(0, 256, 10)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    from dsk_compress.export.kv_cache import export_float_with_past
    from dsk_compress.export.onnx import export_causal_lm

    d = tmp_path_factory.mktemp("kv")
    m = tiny_llama(num_key_value_heads=2)  # grouped-query attention: 4 query heads, 2 KV heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of transformers' cache code
        kv = export_float_with_past(m, d / "m.kv.onnx")
        full = export_causal_lm(m, PROMPT[None], d / "m.onnx")
    return {"model": m, "kv": kv, "full": full}


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    from dsk_compress.compress.qat import freeze_for_export
    from dsk_compress.export.kv_cache import export_int8_qdq_with_past
    from dsk_compress.export.onnx import export_int8_qdq, ort_optimize

    d = tmp_path_factory.mktemp("kv-int8")
    m, names, _ = qat_llama(train_steps=6)  # q/k/v and gate/up share a trained activation quantizer (one Q/DQ per consumer in the graph)
    freeze_for_export(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = export_int8_qdq_with_past(m, d / "q.kv.qdq.onnx")
        kv = ort_optimize(d / "q.kv.qdq.onnx", d / "q.kv.onnx")
        export_int8_qdq(m, PROMPT[None], d / "q.qdq.onnx")
        full = ort_optimize(d / "q.qdq.onnx", d / "q.onnx")
    return {"model": m, "names": names, "info": info, "kv": kv, "full": full}


def test_kv_graph_has_past_inputs_and_present_outputs_per_layer(fp32):
    import onnx

    from dsk_compress.export.kv_cache import kv_layout, layout_from_onnx

    g = onnx.load(str(fp32["kv"])).graph
    ins, outs = [i.name for i in g.input], [o.name for o in g.output]
    assert ins == [
        "input_ids",
        "attention_mask",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert outs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    past = [d.dim_param or d.dim_value for d in g.input[2].type.tensor_type.shape.dim]
    assert past == ["batch", 2, "past_sequence", 16]
    assert layout_from_onnx(fp32["kv"]) == kv_layout(fp32["model"])


def test_kv_greedy_decode_matches_torch_generate(fp32):
    from dsk_compress.runtimes.decoder import KVCacheSession

    with torch.no_grad():
        ref = fp32["model"].generate(torch.as_tensor(PROMPT[None]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, PROMPT.size :]
    tokens, _ = KVCacheSession(fp32["kv"]).greedy(PROMPT, NEW)
    np.testing.assert_array_equal(tokens, ref.numpy())


def test_kv_decode_step_logits_match_torch_cache_loop(fp32):
    from dsk_compress.export.kv_cache import check_kv_parity

    r = check_kv_parity(fp32["model"], fp32["kv"], PROMPT, NEW)
    assert r["tokens_match"] and r["matched_tokens"] == NEW
    assert r["step_logits_max_abs_diff"] < STEP_ATOL


def test_kv_prefill_with_empty_past_equals_full_sequence_graph(fp32):
    from dsk_compress.export.onnx import ort_predict
    from dsk_compress.runtimes.decoder import KVCacheSession

    sess = KVCacheSession(fp32["kv"])
    tokens, _ = sess.greedy(PROMPT, 6)
    cached = sess.step_logits(PROMPT, tokens[:-1])  # last-position logits after the prompt, then after each fed token
    seq = np.concatenate([PROMPT, tokens[:-1]])
    full = ort_predict(fp32["full"])(seq[None])[0, PROMPT.size - 1 :]
    assert cached.shape == full.shape == (6, 256)
    np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5)


def test_kv_wrapper_pads_left_and_windows_like_the_model():
    """Left padding (position ids from the mask) and a Mistral sliding window, in torch: wrapper == model."""
    from transformers import MistralConfig, MistralForCausalLM

    from dsk_compress.export.kv_cache import KVCacheLMWrapper

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    m = MistralForCausalLM(cfg).eval()
    m.config._attn_implementation = "eager"
    w = KVCacheLMWrapper(m)
    assert w.window == 4
    x = torch.as_tensor(PROMPT[None])
    empty = [torch.zeros(1, 2, 0, 16)] * 4
    with torch.no_grad():
        ref = m(input_ids=x, use_cache=False).logits
        got, *present = w(x[:, :6], torch.ones(1, 6, dtype=torch.long), *empty)
        for t in range(6, PROMPT.size):  # the rest token by token, past the window
            step, *present = w(x[:, t : t + 1], torch.ones(1, t + 1, dtype=torch.long), *present)
            got = torch.cat([got, step], 1)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        # two pad slots on the left: same logits for the real tokens
        padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), x], 1)
        mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(x)], 1)
        lp, *_ = w(padded, mask, *empty)
        torch.testing.assert_close(lp[:, 2:], ref, rtol=0, atol=1e-5)


def test_kv_export_refuses_mixed_sliding_and_full_layers():
    from transformers import Qwen2Config

    from dsk_compress.errors import ExportError
    from dsk_compress.export.kv_cache import _sliding_window

    cfg = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(ExportError, match="mixed sliding and full"):
        _sliding_window(cfg)
    assert _sliding_window(Qwen2Config(num_hidden_layers=2)) is None


def test_int8_kv_graph_every_quantized_linear_becomes_an_integer_op(int8):
    from dsk_compress.export.onnx import INTEGER_MATMULS, op_histogram

    hist = op_histogram(int8["kv"])
    assert len(int8["names"]) == 14
    assert sum(v for k, v in hist.items() if k in INTEGER_MATMULS) == 14
    assert int8["info"]["folded_weights"] == 14


def test_int8_kv_decode_matches_full_int8_graph_and_fake_quant_torch(int8):
    from dsk_compress.export.kv_cache import check_kv_parity
    from dsk_compress.export.onnx import ort_predict
    from dsk_compress.runtimes.decoder import KVCacheSession

    r = check_kv_parity(int8["model"], int8["kv"], PROMPT, NEW)
    assert r["tokens_match"]
    assert r["step_logits_sqnr_db"] > 30  # asymmetric uint8 activations: ORT rounds differently from torch (seen 45.9 dB)
    sess = KVCacheSession(int8["kv"])
    tokens, _ = sess.greedy(PROMPT, 6)
    seq = np.concatenate([PROMPT, tokens[:-1]])
    full = ort_predict(int8["full"])(seq[None])[0, PROMPT.size - 1 :]
    # per-tensor static activation scales: a cached step quantizes the same values as the full graph (seen: 0.0)
    np.testing.assert_allclose(sess.step_logits(PROMPT, tokens[:-1]), full, rtol=0, atol=1e-5)


def test_moe_student_kv_export_with_dense_routing_matches_torch(tmp_path):
    from transformers import MixtralForCausalLM

    from dsk_compress.compress.moe import densify_moe
    from dsk_compress.export.kv_cache import check_kv_parity, export_causal_lm_with_past

    torch.manual_seed(0)
    m = MixtralForCausalLM(tiny_mixtral_config(num_hidden_layers=1)).eval()
    m.config._attn_implementation = "eager"
    densify_moe(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kv = export_causal_lm_with_past(m, tmp_path / "moe.kv.onnx")  # no simplify / ORT pass: the trace is what is tested
    r = check_kv_parity(m, kv, PROMPT, 8)
    assert r["tokens_match"] and r["step_logits_max_abs_diff"] < STEP_ATOL


def test_measure_decode_reports_prefill_and_token_rate(fp32):
    from dsk_compress.runtimes.decode import benchmark_decode, measure_decode
    from dsk_compress.runtimes.decoder import KVCacheSession

    r = measure_decode(fp32["kv"], PROMPT, new_tokens=8, threads=1, repeats=2, warmup=1)
    assert r["prompt_tokens"] == PROMPT.size and r["new_tokens"] == 8 and len(r["decode_tokens_per_s_runs"]) == 2
    assert r["prefill_ms"] > 0 and 0 < r["decode_ms_p50"] <= r["decode_ms_p90"] and r["decode_tokens_per_s"] > 0
    # the timed loop generates the same tokens as a plain greedy decode (prefill's token + 8 decode steps)
    np.testing.assert_array_equal(r["tokens"], KVCacheSession(fp32["kv"]).greedy(PROMPT, 9)[0])
    w = benchmark_decode(fp32["kv"], PROMPT, new_tokens=4, threads=1, repeats=1, warmup=0)  # in a worker process
    assert w["tokens"] == r["tokens"][:5] and w["peak_memory_mb"] > 0


def test_kv_session_refuses_a_full_sequence_graph(fp32):
    from dsk_compress.runtimes.base import RuntimeBackendError
    from dsk_compress.runtimes.decoder import KVCacheSession

    with pytest.raises(RuntimeBackendError, match="not a KV-cache graph"):
        KVCacheSession(fp32["full"])


def test_report_table_has_decode_column_with_dash_when_unmeasured():
    from dsk_compress.report import make_report, render_markdown
    from dsk_compress.report.format import DASH, DECODE_COLUMN, TABLE_COLUMNS, table_columns, table_rows
    from dsk_compress.report.html import render_html

    base = {
        "role": "student",
        "stage": "distill",
        "params": 10,
        "size_bytes": 100,
        "accuracy": 50.0,
        "bits_per_byte": None,
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "throughput": 1.0,
        "peak_memory_mb": None,
        "runtime": "onnxruntime-cpu",
        "device": "host-cpu",
        "precision": "fp32",
        "artifact": "a.onnx",
        "notes": "",
    }
    kv = {
        **base,
        "name": "student-distill",
        "decode_tokens_per_s": 812.345,
        "decode": {"prefill_ms": 1.5, "decode_ms_p50": 1.2, "prompt_tokens": 128},
    }
    teacher = {**base, "name": "teacher", "role": "teacher"}
    rep = make_report([kv, teacher], {"run": "r"})
    assert table_columns(rep) == (*TABLE_COLUMNS, DECODE_COLUMN)
    rows = table_rows(rep)
    assert [r[-1] for r in rows] == ["812.3", DASH] and all(len(r) == len(TABLE_COLUMNS) + 1 for r in rows)
    md = render_markdown(rep)
    assert "| Runtime | Decode (tok/s) |" in md and "| onnxruntime-cpu | 812.3 |" in md and "| onnxruntime-cpu | — |" in md
    assert "greedy decode 1.200 ms/token p50, prefill of 128 tokens 1.50 ms" in md
    assert '<th class="num">Decode (tok/s)</th>' in render_html(rep)[0]
    # a report without any decode measurement keeps the old table
    old = make_report([teacher], {"run": "r"})
    assert table_columns(old) == TABLE_COLUMNS and len(table_rows(old)[0]) == len(TABLE_COLUMNS)


def test_kv_export_refuses_a_model_that_is_not_a_causal_lm(tmp_path):
    from dsk_compress.errors import ExportError
    from dsk_compress.export.kv_cache import export_causal_lm_with_past

    with pytest.raises(ExportError, match="not a transformers causal LM"):
        export_causal_lm_with_past(torch.nn.Linear(4, 4), tmp_path / "x.kv.onnx")
    assert not (tmp_path / "x.kv.onnx").exists()
