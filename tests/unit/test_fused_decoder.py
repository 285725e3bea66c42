"""Fused decoder graphs (export.fused): the contrib operators are there, and greedy decoding with IO binding matches torch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import qat_llama, tiny_llama

STEP_ATOL = 1e-4  # fp32 step logits vs torch's cache loop (seen: 1.8e-7)
INT8_MIN_SQNR_DB = 60.0  # int8 vs the torch fake-quant model (seen: 133-134 dB tied and separate, the plain Q/DQ KV graph about the same)
INT4_MIN_SQNR_DB = 15.0  # int4 block 32 vs fp32 torch on the random tiny Llama (seen: 18.6 dB)
INT8_RUNTIME_MIN_SQNR_DB = 15.0  # DynamicQuantizeMatMul / 8-bit MatMulNBits vs fake quant after 6 LSQ steps (seen: 19.2 / 19.3 dB;
# 37.8 / 37.7 dB right after calibration: run-time per-tensor ranges drift from the learned scales as QAT trains)
NEW = 12
PROMPT = np.random.default_rng(0).integers(0, 256, 10)
LAYERS = 2


def _hist(path):
    from dsk_compress.export.onnx import op_histogram

    return op_histogram(path)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    from dsk_compress.export.fused import export_fused

    d = tmp_path_factory.mktemp("fused")
    m = tiny_llama(num_key_value_heads=2)  # grouped-query attention: 4 query heads, 2 KV heads
    return {"model": m, "fp32": export_fused(m, d / "m.fused.onnx"), "int4": export_fused(m, d / "m.int4.onnx", "int4"), "dir": d}


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    """QAT tiny Llamas after a few LSQ steps: the default (q/k/v and gate/up share one activation quantizer) and one trained
    with a quantizer per Linear (a version-1 QAT model), whose q/k/v and gate/up scales drifted apart."""
    from dsk_compress.compress.qat import QuantLinear, freeze_for_export
    from dsk_compress.export.fused import export_fused

    d = tmp_path_factory.mktemp("fused-int8")
    out = {"dir": d}
    for kind, share in (("tied", True), ("separate", False)):
        m, names, _ = qat_llama(share, train_steps=6, num_key_value_heads=2)
        freeze_for_export(m)
        out[kind] = {
            "model": m,
            "names": names,
            "quant": [mod for mod in m.modules() if isinstance(mod, QuantLinear)],
            "path": export_fused(m, d / f"q.{kind}.onnx", "int8"),
        }
    return out


def test_fused_fp32_graph_has_one_attention_op_per_layer_and_fused_norms(fp32):
    hist = _hist(fp32["fp32"])
    assert hist["GroupQueryAttention"] == LAYERS
    # per layer: a skip+norm before attention (the first layer's is a plain norm) and one before the MLP; the final norm
    assert hist["SkipSimplifiedLayerNormalization"] == 2 * LAYERS and hist["SimplifiedLayerNormalization"] == 1
    # packed q/k/v, o, packed gate/up, down per layer + lm_head
    assert hist["MatMul"] == 4 * LAYERS + 1 and hist["QuickGelu"] == LAYERS
    assert not {"Softmax", "Transpose", "Pow", "ReduceMean", "Sin", "Cos", "Concat"} & set(hist)
    assert sum(hist.values()) == 1 + LAYERS * 10 + 2  # Gather, 10 nodes per layer (norms included), final norm, lm_head


def test_fused_fp32_step_logits_match_torch_cache_loop(fp32):
    from dsk_compress.export.fused import check_fused_parity

    r = check_fused_parity(fp32["model"], fp32["fp32"], PROMPT, NEW)
    assert r["tokens_match"] and r["matched_tokens"] == NEW
    assert r["step_logits_max_abs_diff"] < STEP_ATOL


def test_fused_greedy_decode_equals_torch_generate(fp32):
    from dsk_compress.runtimes.decoder import FusedDecoderSession

    with torch.no_grad():
        ref = fp32["model"].generate(torch.as_tensor(PROMPT[None]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, PROMPT.size :]
    sess = FusedDecoderSession(fp32["fp32"])
    tokens, _ = sess.greedy(PROMPT, NEW)
    np.testing.assert_array_equal(tokens, ref.numpy())
    assert sess.max_sequence == PROMPT.size + NEW - 1  # the buffer the decode needed, allocated once
    # a second decode reuses the buffers and gives the same tokens
    np.testing.assert_array_equal(sess.greedy(PROMPT, NEW)[0], tokens)


def test_fused_prefill_logits_equal_torch_full_sequence(fp32):
    from dsk_compress.runtimes.decoder import FusedDecoderSession

    with torch.no_grad():
        ref = fp32["model"](input_ids=torch.as_tensor(PROMPT[None])).logits[0].numpy()
    np.testing.assert_allclose(FusedDecoderSession(fp32["fp32"]).prefill(PROMPT), ref, rtol=0, atol=1e-5)


def test_fused_int4_has_one_matmulnbits_per_matmul_and_bounded_error(fp32):
    from dsk_compress.compress.qat import sqnr_db
    from dsk_compress.export.kv_cache import torch_greedy
    from dsk_compress.runtimes.decoder import FusedDecoderSession

    hist = _hist(fp32["int4"])
    assert hist["MatMulNBits"] == 4 * LAYERS + 1 and "MatMul" not in hist
    assert hist["GroupQueryAttention"] == LAYERS
    import onnx

    nbits = [n for n in onnx.load(str(fp32["int4"])).graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in nbits[0].attribute if a.name in ("bits", "block_size")} == {"bits": 4, "block_size": 32}
    ref_tokens, ref_logits = torch_greedy(fp32["model"], PROMPT, NEW)
    got = FusedDecoderSession(fp32["int4"]).step_logits(PROMPT, ref_tokens[:-1])
    assert sqnr_db(ref_logits, got) > INT4_MIN_SQNR_DB


def _int8_columns(path) -> int:
    """Output columns of every MatMulIntegerToFloat, checking each weight is int8."""
    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    cols = 0
    for n in g.node:
        if n.op_type == "MatMulIntegerToFloat":
            w = inits[n.input[1]]
            assert w.data_type == onnx.TensorProto.INT8
            cols += w.dims[1]
    return cols


def test_fused_int8_with_shared_quantizers_packs_like_fp32_plus_one_quantize_per_matmul(int8, fp32):
    from dsk_compress.export.onnx import INTEGER_MATMULS

    t = int8["tied"]
    assert len(t["names"]) == 7 * LAYERS
    hist = _hist(t["path"])
    # per layer: packed q/k/v, o, packed gate/up, down, each one QuantizeLinear + one MatMulIntegerToFloat
    assert hist["MatMulIntegerToFloat"] == 4 * LAYERS and hist["QuantizeLinear"] == 4 * LAYERS
    assert set(hist) & INTEGER_MATMULS == {"MatMulIntegerToFloat"} and hist["MatMul"] == 1  # lm_head, left in float by QAT
    assert hist["Split"] == LAYERS and hist["GroupQueryAttention"] == LAYERS
    fp = _hist(fp32["fp32"])
    assert sum(hist.values()) == sum(fp.values()) + 4 * LAYERS == 1 + LAYERS * 14 + 2
    # together the integer MatMuls hold every quantized Linear's output columns, as int8
    assert _int8_columns(t["path"]) == sum(mod.out_features for mod in t["quant"])


def test_fused_int8_with_separate_quantizers_keeps_one_integer_matmul_per_linear(int8):
    """A QAT model trained without shared quantizers (version 1): q/k/v and gate/up see different integer inputs."""
    s = int8["separate"]
    hist = _hist(s["path"])
    assert hist["MatMulIntegerToFloat"] == 7 * LAYERS and hist["QuantizeLinear"] == 7 * LAYERS and "Split" not in hist
    assert sum(hist.values()) == 1 + LAYERS * 19 + 2  # 19 per layer: 14 for the Linears, 2 norms, attention, QuickGelu, Mul
    assert _int8_columns(s["path"]) == sum(mod.out_features for mod in s["quant"])


@pytest.mark.parametrize("kind", ["tied", "separate"])
def test_fused_int8_matches_fake_quant_at_least_as_well_as_the_plain_kv_graph(int8, kind):
    from dsk_compress.export.fused import check_fused_parity
    from dsk_compress.export.kv_cache import check_kv_parity, export_int8_qdq_with_past
    from dsk_compress.export.onnx import INTEGER_MATMULS, op_histogram, ort_optimize

    m = int8[kind]
    r = check_fused_parity(m["model"], m["path"], PROMPT, NEW)
    assert r["tokens_match"] and r["step_logits_sqnr_db"] > INT8_MIN_SQNR_DB
    d = int8["dir"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of transformers' cache code
        export_int8_qdq_with_past(m["model"], d / f"{kind}.kv.qdq.onnx")
    kv = ort_optimize(d / f"{kind}.kv.qdq.onnx", d / f"{kind}.kv.onnx")
    # the plain graph keeps one integer MatMul per Linear (its Q/DQ unshared per consumer) with either kind of QAT model
    assert sum(v for k, v in op_histogram(kv).items() if k in INTEGER_MATMULS) == 7 * LAYERS
    plain = check_kv_parity(m["model"], kv, PROMPT, NEW)
    assert r["step_logits_sqnr_db"] >= plain["step_logits_sqnr_db"] - 1.0


def test_fused_int8_symmetric_activations_run_as_uint8_with_zero_point_128(tmp_path):
    """A symmetric int8 quantizer is exactly the uint8 one shifted by 128 (same grid and clamping), which ONNX Runtime's x86
    integer GEMMs run fast; the graph must match the fake-quant model as closely as an asymmetric one."""
    import onnx
    from onnx import numpy_helper

    from dsk_compress.compress.qat import freeze_for_export
    from dsk_compress.export.fused import check_fused_parity, export_fused

    m, _, _ = qat_llama(activations="symmetric", train_steps=4, num_hidden_layers=1)
    freeze_for_export(m)
    p = export_fused(m, tmp_path / "s.onnx", "int8")
    zps = [i for i in onnx.load(str(p)).graph.initializer if i.name.endswith("act_zero_point")]
    assert len(zps) == 4 and all(
        z.data_type == onnx.TensorProto.UINT8 and numpy_helper.to_array(z).reshape(-1).tolist() == [128] for z in zps
    )
    r = check_fused_parity(m, p, PROMPT, NEW)
    assert r["tokens_match"] and r["step_logits_sqnr_db"] > INT8_MIN_SQNR_DB


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_fused_other_llama_families_decode_like_torch(tmp_path, family):
    """Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), Mistral (sliding window shorter than the decode)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from dsk_compress.export.fused import check_fused_parity, export_fused

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cls, cfg = {
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**common)),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(head_dim=16, **common)),
        "mistral": (MistralForCausalLM, MistralConfig(sliding_window=4, **common)),
    }[family]
    torch.manual_seed(0)
    m = cls(cfg).eval()
    m.config._attn_implementation = "eager"
    if family == "qwen3":  # norms of ones would hide a missing norm
        for layer in m.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_norm.weight, 1.0, 0.3)
            torch.nn.init.normal_(layer.self_attn.k_norm.weight, 1.0, 0.3)
    r = check_fused_parity(m, export_fused(m, tmp_path / f"{family}.onnx"), PROMPT, NEW)
    assert r["tokens_match"] and r["step_logits_max_abs_diff"] < STEP_ATOL


def test_measure_decode_runs_the_fused_graph_with_the_same_tokens(fp32):
    from dsk_compress.runtimes.decode import benchmark_decode, measure_decode
    from dsk_compress.runtimes.decoder import FusedDecoderSession

    r = measure_decode(fp32["fp32"], PROMPT, new_tokens=8, threads=1, repeats=2, warmup=1)
    assert r["graph"] == "fused" and r["decode_tokens_per_s"] > 0 and len(r["decode_tokens_per_s_runs"]) == 2
    np.testing.assert_array_equal(r["tokens"], FusedDecoderSession(fp32["fp32"]).greedy(PROMPT, 9)[0])
    w = benchmark_decode(fp32["fp32"], PROMPT, new_tokens=0, threads=1, repeats=2, warmup=0)  # prefill only, in a worker
    assert w["graph"] == "fused" and w["prefill_ms"] > 0 and "decode_tokens_per_s" not in w and w["tokens"] == r["tokens"][:1]


def test_fused_session_refuses_a_plain_kv_graph_and_an_overlong_decode(fp32, tmp_path):
    from dsk_compress.export.kv_cache import export_float_with_past
    from dsk_compress.runtimes.base import RuntimeBackendError
    from dsk_compress.runtimes.decode import decode_session
    from dsk_compress.runtimes.decoder import FusedDecoderSession, KVCacheSession

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kv = export_float_with_past(fp32["model"], tmp_path / "m.kv.onnx")
    with pytest.raises(RuntimeBackendError, match="not a fused decoder graph"):
        FusedDecoderSession(kv)
    assert isinstance(decode_session(kv), KVCacheSession) and isinstance(decode_session(fp32["fp32"]), FusedDecoderSession)
    with pytest.raises(RuntimeBackendError, match="exceed the model's 256 positions"):
        FusedDecoderSession(fp32["fp32"]).greedy(PROMPT, 300)


def test_decodes_of_several_graphs_run_in_interleaved_rounds_in_one_worker(fp32, tmp_path):
    from dsk_compress.export.kv_cache import export_float_with_past
    from dsk_compress.runtimes.decode import benchmark_decodes
    from dsk_compress.runtimes.measure import decode_rounds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kv = export_float_with_past(fp32["model"], tmp_path / "m.kv.onnx")
    fused, plain = benchmark_decodes([fp32["fp32"], kv], PROMPT, new_tokens=6, threads=1, repeats=3, warmup=1)
    assert (fused["graph"], plain["graph"]) == ("fused", "kv") and fused["repeats"] == plain["repeats"] == 3
    assert len(fused["decode_tokens_per_s_runs"]) == len(plain["decode_tokens_per_s_runs"]) == 3
    assert fused["tokens"] == plain["tokens"] and len(fused["tokens"]) == 7  # fp32 fused == fp32 plain KV, greedy
    assert "peak_memory_mb" not in fused  # one process held both graphs: no per-graph memory figure

    # each round starts one further along the list, so no decoder always runs first
    order = []

    def decoder(i):
        return (lambda: order.append(i) or np.zeros(4)), (lambda tok, total: np.zeros(4))

    decode_rounds([decoder(0), decoder(1), decoder(2)], 3, 1, rounds=3, warmup=0, settle_s=0)
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1]


def test_fused_export_refuses_moe_and_wrong_precisions(tmp_path, fp32):
    from conftest import tiny_mixtral_config
    from transformers import MixtralForCausalLM

    from dsk_compress.errors import ExportError
    from dsk_compress.export.fused import export_fused

    with pytest.raises(ExportError, match="no dense gated MLP"):
        export_fused(MixtralForCausalLM(tiny_mixtral_config(num_hidden_layers=1)), tmp_path / "moe.onnx")
    with pytest.raises(ExportError, match="needs a QAT model"):
        export_fused(fp32["model"], tmp_path / "x.onnx", "int8")
    with pytest.raises(ExportError, match="unknown fused precision"):
        export_fused(fp32["model"], tmp_path / "x.onnx", "int2")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(("kernel", "op"), [("dynamic", "DynamicQuantizeMatMul"), ("nbits", "MatMulNBits")])
def test_fused_int8_run_time_activation_kernels_pack_every_group(int8, kernel, op):
    """The alternatives to the static kernel: QAT's int8 weights, activations quantized at run time (not bit-compatible)."""
    import onnx

    from dsk_compress.export.fused import check_fused_parity, export_fused

    p = export_fused(int8["tied"]["model"], int8["dir"] / f"q.{kernel}.onnx", "int8", int8_kernel=kernel)
    hist = _hist(p)
    assert hist[op] == 4 * LAYERS and "QuantizeLinear" not in hist and hist["MatMul"] == 1
    if kernel == "nbits":  # QAT's per-channel scales repeated per block: the weights are exactly QAT's
        n = next(n for n in onnx.load(str(p)).graph.node if n.op_type == "MatMulNBits")
        assert {a.name: a.i for a in n.attribute if a.name in ("bits", "accuracy_level")} == {"bits": 8, "accuracy_level": 4}
    r = check_fused_parity(int8["tied"]["model"], p, PROMPT, NEW)
    assert r["step_logits_sqnr_db"] > INT8_RUNTIME_MIN_SQNR_DB


def test_fused_predict_scores_a_batch_like_the_torch_model(fp32):
    from dsk_compress.runtimes.decode import fused_predict

    x = np.random.default_rng(1).integers(0, 256, (3, 20))
    with torch.no_grad():
        ref = fp32["model"](input_ids=torch.as_tensor(x)).logits.numpy()
    np.testing.assert_allclose(fused_predict(fp32["fp32"])(x), ref, rtol=0, atol=1e-5)


def test_export_fused_checked_reports_parity_and_raises_on_a_mismatch(tmp_path, fp32):
    from conftest import tiny_mixtral_config
    from transformers import MixtralForCausalLM

    from dsk_compress.errors import ExportError
    from dsk_compress.export.fused import export_fused_checked

    example = np.concatenate([PROMPT, PROMPT])[None]
    info = export_fused_checked(fp32["model"], tmp_path / "m.onnx", "fp32", example, parity_atol=1e-3, min_sqnr_db=30.0)
    assert info["tokens_match"] and info["prompt_tokens"] == 16 and info["fused_ops"]["GroupQueryAttention"] == LAYERS
    with pytest.raises(ExportError, match="differ from torch"):
        export_fused_checked(fp32["model"], tmp_path / "m.onnx", "fp32", example, parity_atol=1e-12, min_sqnr_db=30.0)
    moe = export_fused_checked(
        MixtralForCausalLM(tiny_mixtral_config(num_hidden_layers=1)),
        tmp_path / "moe.onnx",
        "fp32",
        example,
        parity_atol=1e-3,
        min_sqnr_db=30.0,
    )
    assert "no dense gated MLP" in moe["error"] and not (tmp_path / "moe.onnx").exists()


def test_quantize_int4_turns_a_full_sequence_export_into_matmulnbits(fp32):
    """The export stage's int4 variant: the fp32 full-sequence graph with every Linear as MatMulNBits, scored like any variant."""
    from dsk_compress.compress.qat import sqnr_db
    from dsk_compress.export.fused import INT4_MIN_SQNR_DB, quantize_int4
    from dsk_compress.export.onnx import export_float, lm_logits, ort_predict

    example = np.random.default_rng(2).integers(0, 256, (2, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = export_float(fp32["model"], example, fp32["dir"] / "full.onnx", 17, "extended", 1e-3, False)["path"]
    out = quantize_int4(full, fp32["dir"] / "full.int4.onnx")
    hist = _hist(out)
    assert hist["MatMulNBits"] == 7 * LAYERS + 1  # q, k, v, o, gate, up, down per layer + lm_head
    import onnx

    g = onnx.load(str(out)).graph
    weights = {i.name for i in g.initializer}
    assert not [
        n.name for n in g.node if n.op_type in ("MatMul", "FusedMatMul") and n.input[1] in weights
    ]  # only activation x activation left
    assert sqnr_db(lm_logits(fp32["model"], example), ort_predict(out)(example)) > INT4_MIN_SQNR_DB
