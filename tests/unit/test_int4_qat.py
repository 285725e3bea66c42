"""int4 QAT (ONNX Runtime's MatMulNBits, accuracy_level 4): the fake quant computes what the kernel computes, the exported
graphs carry the QAT model's own integers and trained scales, and every graph (full-sequence, KV-cache, fused) decodes like
the fake-quant torch model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import int4_qat_llama, qat_llama
from onnx import helper, numpy_helper

from dsk_compress.compress.qat import (
    BlockQuantLinear,
    block_quant_layers,
    init_block_scales,
    int4_qat_info,
    load_qat_model,
    prepare_int4_qat,
    qat_scheme,
    save_qat_model,
    sqnr_db,
)
from dsk_compress.errors import ExportError
from dsk_compress.export.int4 import export_int4_kv, export_int4_lm
from dsk_compress.export.qat_graphs import nbits_arrays, pack_nbits, unpack_nbits

MIN_SQNR_DB = 40.0  # exported graph vs the fake-quant torch model, step logits (seen: 70-130 dB on the trained tiny Llamas)
KERNEL_SQNR_DB = 100.0  # one MatMulNBits vs BlockQuantLinear: the same integers, only float summation order differs (seen: 135 dB)


def _nbits_session(arrays: dict, k: int, accuracy_level: int):
    import onnxruntime as ort

    attrs = {**arrays["attrs"], "accuracy_level": accuracy_level}
    bias = arrays["bias"] is not None
    node = helper.make_node("MatMulNBits", ["A", "B", "S", *(["", "", "bias"] if bias else [])], ["Y"], domain="com.microsoft", **attrs)
    inits = [numpy_helper.from_array(arrays["B"], "B"), numpy_helper.from_array(arrays["scales"], "S")]
    if bias:
        inits.append(numpy_helper.from_array(arrays["bias"], "bias"))
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["m", attrs["N"]])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_nbits_round_trips_and_is_onnxruntimes_own_layout(bits):
    from dsk_compress.export.fused import _nbits_quantizer_module

    DefaultWeightOnlyQuantizer = _nbits_quantizer_module().DefaultWeightOnlyQuantizer  # noqa: N806 (ONNX Runtime's class)

    rng = np.random.default_rng(bits)
    q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(6, 96)).astype(np.int8)
    packed = pack_nbits(q, bits, 32)
    assert packed.shape == (6, 3, 32 * bits // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_nbits(packed, bits, 96), q)
    if bits == 4:  # ORT's reference packer (low nibble first) on the values stored with zero point 8
        ref = DefaultWeightOnlyQuantizer.pack_int8_to_int4((q[0, :32].astype(np.int16) + 8).astype(np.uint8))
        assert np.array_equal(packed[0, 0], ref)
    with pytest.raises(ExportError, match="range"):
        pack_nbits(np.full((1, 32), 2 ** (bits - 1), np.int16), bits, 32)


@pytest.mark.parametrize(("bits", "k", "bias"), [(4, 96, False), (8, 96, False), (4, 80, True)])  # 80: a partial last block
@pytest.mark.parametrize("rows", [1, 7])
def test_block_quant_linear_computes_what_matmulnbits_computes(bits, k, bias, rows):
    """The fake quant (int8 activations per row and block, absmax / 127, half-to-even; bits-bit block weights) against
    ONNX Runtime's kernel with accuracy_level 4, on the packed integers and scales of the same layer."""
    torch.manual_seed(bits + rows)
    layer = BlockQuantLinear(torch.nn.Linear(k, 40, bias=bias), bits).eval()
    x = torch.randn(rows, k) * 3
    with torch.no_grad():
        ref = layer(x).numpy()
    arrays = nbits_arrays([layer])
    got = _nbits_session(arrays, k, 4).run(None, {"A": x.numpy()})[0]
    assert sqnr_db(ref, got) >= KERNEL_SQNR_DB
    fp32 = _nbits_session(arrays, k, 0).run(None, {"A": x.numpy()})[0]  # fp32 compute: the activation quantization is real
    assert sqnr_db(ref, fp32) < 60


def test_mse_scale_init_has_less_weight_error_than_absmax():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.rand(64, 1)
    err = {}
    for how in ("absmax", "mse"):
        s = init_block_scales(w, 4, 32, how)
        q = torch.clamp(torch.round(w.reshape(64, 4, 32) / s[..., None]), -8, 7)
        err[how] = float(((q * s[..., None]).reshape(64, 128) - w).pow(2).sum())
    assert err["mse"] < 0.85 * err["absmax"]  # seen: 0.80 on Gaussian rows


def test_lsq_gradients_reach_weights_and_scales_and_scales_get_no_weight_decay():
    layer = BlockQuantLinear(torch.nn.Linear(32, 1, bias=False), 4, scale_init="absmax")
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0] = 0.33
        layer.weight[0, 1] = 7.0  # absmax 7 -> scale 1: 0.33 rounds to 0, 7 is the top level
        layer.weight_scale.fill_(0.1)  # 0.33 / 0.1 = 3.3 -> level 3; 7.0 / 0.1 = 70 -> clamped to 7
    wq = layer.quantized_weight()
    assert wq[0, 0].item() == pytest.approx(0.3) and wq[0, 1].item() == pytest.approx(0.7)
    wq[0, :2].sum().backward()
    g = 1 / np.sqrt(32 * 7)
    assert layer.weight_scale.grad.item() == pytest.approx(((3 - 3.3) + 7) * g, rel=1e-5)  # LSQ: q - w/s inside, the level outside
    assert layer.weight.grad[0, 0].item() == 1.0 and layer.weight.grad[0, 1].item() == 0.0  # straight through inside the range only
    assert layer.weight_scale.ndim == 1  # the trainer's AdamW decays only parameters of 2 or more dimensions


def test_int4_qat_training_moves_weights_and_scales():
    torch.manual_seed(0)
    m0, _ = int4_qat_llama(train_steps=0)
    init = {n: p.detach().clone() for n, p in m0.named_parameters() if n.endswith("weight_scale")}
    m1, names = int4_qat_llama(train_steps=5)
    moved = [n for n, p in m1.named_parameters() if n.endswith("weight_scale") and not torch.equal(p, init[n])]
    assert len(moved) == len(init) == len(block_quant_layers(m1)) == 15  # 2 layers x 7 Linears + the LM head
    assert names[0] == "lm_head" and "model.embed_tokens" in names and qat_scheme(m1) == "int4"


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    from dsk_compress.export.fused import export_fused_checked

    m, names = int4_qat_llama()
    d = tmp_path_factory.mktemp("int4")
    ex = np.random.default_rng(0).integers(0, 256, (2, 24))
    full = export_int4_lm(m, ex, d / "m.onnx", min_sqnr_db=MIN_SQNR_DB)
    kv = export_int4_kv(m, d / "m.kv.onnx", ex, min_sqnr_db=MIN_SQNR_DB)
    fused = export_fused_checked(m, d / "m.fused.onnx", "int4", ex, parity_atol=1e-3, min_sqnr_db=MIN_SQNR_DB)
    return {"model": m, "names": names, "example": ex, "full": full, "kv": kv, "fused": fused, "dir": d}


def test_int4_graphs_match_the_fake_quant_model_and_decode_the_same_tokens(int4):
    assert int4["full"]["sqnr_db_vs_fake_quant"] >= MIN_SQNR_DB
    for kind in ("kv", "fused"):
        assert int4[kind]["step_logits_sqnr_db"] >= MIN_SQNR_DB, kind
        assert int4[kind]["tokens_match"] and int4[kind]["matched_tokens"] == 8, kind


def test_int4_graphs_pack_every_linear_once_and_q_k_v_gate_up_together_in_the_fused_graph(int4):
    assert int4["full"]["matmul_nbits"] == int4["kv"]["matmul_nbits"] == 15 and int4["full"]["int8_embeddings"] == 1
    for kind in ("full", "kv"):
        g = onnx.load(str(int4[kind]["path"])).graph
        assert not [n for n in g.node if n.op_type == "MatMul" and n.input[1] in {t.name for t in g.initializer}], kind
    assert int4["fused"]["fused_ops"]["MatMulNBits"] == 2 * 4 + 1  # per layer: qkv, o, gate_up, down; and the head
    assert "QuantizeLinear" not in int4["fused"]["fused_ops"]


def _nbits_nodes(path):
    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    return [
        ({a.name: helper.get_attribute_value(a) for a in n.attribute}, inits[n.input[1]], inits[n.input[2]])
        for n in g.node
        if n.op_type == "MatMulNBits"
    ], inits


def test_exported_weights_are_the_qat_integers_and_trained_scales_bit_exact(int4):
    """No re-quantization: every MatMulNBits' scales are a layer's learned scales and its packed values that layer's integers."""
    layers = block_quant_layers(int4["model"])
    nodes, _ = _nbits_nodes(int4["full"]["path"])
    assert len(nodes) == len(layers)
    by_scales = {layer.block_scales().detach().numpy().tobytes(): layer for layer in layers}
    for attrs, packed, scales in nodes:
        layer = by_scales[scales.tobytes()]  # a KeyError here: scales that are not a layer's own
        q, _ = layer.integer_weight()
        assert attrs["bits"] == layer.weight_bits and attrs["accuracy_level"] == 4 and attrs["block_size"] == 32
        assert np.array_equal(unpack_nbits(packed, attrs["bits"], attrs["K"]), q.numpy())
    fused, _ = _nbits_nodes(int4["fused"]["path"])
    qkv = next(s for a, _, s in fused if a["N"] == 3 * 64)
    attn = int4["model"].model.layers[0].self_attn
    assert np.array_equal(
        qkv,
        np.concatenate(
            [
                attn.q_proj.block_scales().detach().numpy(),
                attn.k_proj.block_scales().detach().numpy(),
                attn.v_proj.block_scales().detach().numpy(),
            ]
        ),
    )


def test_int4_head_is_8_bit_and_embedding_an_int8_table(int4):
    nodes, inits = _nbits_nodes(int4["full"]["path"])
    head = [a for a, _, _ in nodes if a["N"] == 256]
    assert [a["bits"] for a in head] == [8] and sum(a["bits"] == 4 for a, _, _ in nodes) == 14
    tables = [v for v in inits.values() if v.shape == (256, 64)]
    assert len(tables) == 1 and tables[0].dtype == np.uint8  # no float copy of the embedding
    q, s = int4["model"].model.embed_tokens.integer_table()
    assert np.array_equal(tables[0].astype(np.int16) - 128, q.numpy())
    m = onnx.load(str(int4["full"]["path"]))
    (gbq,) = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    attrs = {a.name: a.i for a in gbq.attribute}
    assert attrs == {"gather_axis": 0, "quantize_axis": 1, "block_size": 64, "bits": 8}
    np.testing.assert_array_equal(inits[gbq.input[2]], s.numpy()[:, None])  # one scale per row, the QAT's own


@pytest.mark.parametrize("hidden", [48, 192])
def test_int8_embedding_lookup_equals_the_fake_quant_with_a_short_last_block(hidden):
    """GatherBlockQuantized's block is a power of two: a hidden size that is not one (192: blocks of 128 and 64) still
    gives every row its one scale, bit for bit the fake quant's numbers."""
    import onnxruntime as ort

    from dsk_compress.compress.qat import QuantEmbedding
    from dsk_compress.export.qat_graphs import embedding_nodes

    torch.manual_seed(hidden)
    emb = QuantEmbedding(torch.nn.Embedding(300, hidden))
    inits, nodes = [], []

    def add_init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def add_node(op, inputs, name, output, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, [output or name + "/out"], name=name, domain=domain or None, **attrs))
        return output or name + "/out"

    embedding_nodes(add_init, add_node, emb, "ids", "embed", "rows")
    g = helper.make_graph(
        nodes,
        "emb",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, [None, hidden])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    ids = np.array([0, 7, 299, 7, 150], np.int64)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    with torch.no_grad():
        want = emb(torch.from_numpy(ids)).numpy()
    assert [n.op_type for n in nodes] == ["GatherBlockQuantized"]
    np.testing.assert_array_equal(got, want)


def test_saved_int4_graphs_load_in_the_onnxruntime_their_bundle_asks_for(int4):
    """ONNX Runtime 1.32's optimizer marks each MatMulNBits ``weight_prepacked = 0``, which onnxruntime before 1.29 refuses:
    the saved graphs drop it, and the bundle floor follows the operators (8-bit head 1.22, int8 embedding 1.23)."""
    from dsk_compress.export.bundle import ORT_FLOOR, onnxruntime_floor

    for kind in ("full", "kv", "fused"):
        g = onnx.load(str(int4[kind]["path"])).graph
        assert not [a for n in g.node for a in n.attribute if a.name == "weight_prepacked"], kind
        assert onnxruntime_floor([int4[kind]["path"]]) == "1.23", kind
    marked = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", bits=4, weight_prepacked=0)
    plain = helper.make_node("MatMul", ["x", "w"], ["y"])
    for nodes, floor in (([plain], ORT_FLOOR), ([marked], "1.29")):
        path = int4["dir"] / f"floor-{floor}.onnx"
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", [], [])), str(path))
        assert onnxruntime_floor([path]) == floor


def test_int4_head_bits_4_and_float_head_and_embedding_export_too(tmp_path):
    ex = np.random.default_rng(1).integers(0, 256, (1, 16))
    m, names = int4_qat_llama(train_steps=10, head_bits=4, embedding_bits=None)
    r = export_int4_lm(m, ex, tmp_path / "h4.onnx", min_sqnr_db=MIN_SQNR_DB)
    assert (r["matmul_nbits"], r["int8_embeddings"]) == (15, 0) and "model.embed_tokens" not in names
    m, names = int4_qat_llama(train_steps=10, head_bits=None)
    r = export_int4_lm(m, ex, tmp_path / "hf.onnx", min_sqnr_db=MIN_SQNR_DB)
    assert (r["matmul_nbits"], r["int8_embeddings"]) == (14, 1) and "lm_head" not in names


def test_int4_qwen2_with_qkv_bias_and_tied_embeddings_exports_every_graph(tmp_path):
    """Biases ride on MatMulNBits (fused) or stay an Add (traced); a tied table is both the int8 embedding and the 8-bit head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dsk_compress.export.fused import export_fused_checked

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    ).eval()
    m.config._attn_implementation = "eager"
    prepare_int4_qat(m)
    ex = np.random.default_rng(0).integers(0, 256, (2, 24))
    assert export_int4_lm(m, ex, tmp_path / "q.onnx", min_sqnr_db=MIN_SQNR_DB)["int8_embeddings"] == 1
    for info in (
        export_int4_kv(m, tmp_path / "q.kv.onnx", ex, min_sqnr_db=MIN_SQNR_DB),
        export_fused_checked(m, tmp_path / "q.fused.onnx", "int4", ex, parity_atol=1e-3, min_sqnr_db=MIN_SQNR_DB),
    ):
        assert info["tokens_match"] and info["step_logits_sqnr_db"] >= MIN_SQNR_DB


def test_int4_qat_model_saves_and_loads_with_identical_outputs(int4, tmp_path):
    m = int4["model"]
    save_qat_model(m, tmp_path / "q", int4_qat_info(32, "mse", 8, 8, [], int4["names"]))
    back = load_qat_model(tmp_path / "q")
    x = torch.as_tensor(int4["example"])
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, m(input_ids=x).logits)
    assert qat_scheme(back) == "int4"


def test_fused_export_refuses_a_qat_model_in_another_precision(int4, tmp_path):
    from dsk_compress.export.fused import export_fused

    with pytest.raises(ExportError, match="needs a QAT model trained in int8"):
        export_fused(int4["model"], tmp_path / "x.onnx", "int8")
    with pytest.raises(ExportError, match="int4 QAT model"):
        export_fused(int4["model"], tmp_path / "x.onnx", "fp32")
    q8, _, _ = qat_llama()
    with pytest.raises(ExportError, match="int8 QAT model"):
        export_fused(q8, tmp_path / "x.onnx", "int4")


def test_prepare_int4_qat_refuses_bad_settings():
    from conftest import tiny_llama

    with pytest.raises(ValueError, match="scale_init"):
        prepare_int4_qat(tiny_llama(), scale_init="minmax")
    with pytest.raises(ValueError, match="head_bits"):
        prepare_int4_qat(tiny_llama(), head_bits=2)
    with pytest.raises(ValueError, match="power of two"):
        BlockQuantLinear(torch.nn.Linear(32, 8), 4, block_size=24)


def test_qat_config_precisions_are_checked():
    from pydantic import ValidationError

    from dsk_compress.recipes.stages.qat import QATConfig

    assert QATConfig(precisions=["int4", "int8", "int4"]).precisions == ["int4", "int8"]
    assert QATConfig().precisions == ["int8"] and QATConfig().int4.head_bits == 8
    for bad in ({"precisions": []}, {"precisions": ["int2"]}, {"int4": {"block_size": 24}}, {"int4": {"head_bits": 2}}):
        with pytest.raises(ValidationError):
            QATConfig(**bad)


def test_importing_onnxruntimes_nbits_quantizer_leaves_the_root_logger_alone():
    """ONNX Runtime's module calls logging.basicConfig(level=INFO) on import; the export stage's import undoes that."""
    import logging
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from dsk_compress.export.fused import _nbits_quantizer_module\n"
        "_nbits_quantizer_module()\n"
        "r = logging.getLogger()\n"
        "print(r.level, len(r.handlers))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(logging.WARNING), "0"]
