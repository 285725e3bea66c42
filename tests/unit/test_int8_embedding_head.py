"""The int8 precision's embedding and LM head: the QAT model's int8 table (one scale per row) and quantized head in every
ONNX Runtime graph (full sequence, KV cache, fused decoder), the same numbers as the fake quant; PTQ baselines that
quantize the head as QAT does; a fused decoder graph that serves as the full-sequence model, so a CPU bundle ships its
weights once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama

VOCAB = 256


@pytest.fixture(scope="module")
def int8_lm(tmp_path_factory):
    """A tiny QAT Llama with the int8 embedding and the LM head quantized (the qat stage's defaults), exported to the full,
    KV-cache and fused int8 graphs."""
    from dsk_compress.compress.qat import calibrate, freeze_for_export, prepare_qat
    from dsk_compress.export.fused import export_fused
    from dsk_compress.export.int8 import export_int8_lm
    from dsk_compress.export.kv_cache import export_kv_cache

    d = tmp_path_factory.mktemp("int8-emb")
    m = tiny_llama()
    names = prepare_qat(m, 8, True, [], activations="symmetric", embedding_bits=8)
    g = torch.Generator().manual_seed(1)
    calibrate(m, [torch.randint(0, VOCAB, (4, 32), generator=g) for _ in range(3)])
    freeze_for_export(m)
    x = np.random.default_rng(0).integers(0, VOCAB, (2, 40))
    full = export_int8_lm(m, x, d / "q.qdq.onnx", d / "q.onnx", min_sqnr_db=30)
    kv = export_kv_cache(m, d / "q.kv.onnx", x[:1], int8=True, min_sqnr_db=30, parity_atol=1e-3)
    fused = export_fused(m, d / "q.fused.onnx", precision="int8")
    return {"model": m, "names": names, "x": x, "full": full, "kv": kv, "fused": fused, "dir": d}


def _graph(path):
    import onnx

    return onnx.load(str(path))


def _int8_tables(path) -> list:
    from onnx import numpy_helper

    return [numpy_helper.to_array(t) for t in _graph(path).graph.initializer if t.data_type == 3 and tuple(t.dims)[:1] == (VOCAB,)]


def test_qat_quantizes_the_embedding_and_the_head(int8_lm):
    from dsk_compress.compress.qat import QuantEmbedding, QuantLinear, qat_scheme

    m = int8_lm["model"]
    assert isinstance(m.model.embed_tokens, QuantEmbedding) and isinstance(m.lm_head, QuantLinear)
    assert {"lm_head", "model.embed_tokens"} <= set(int8_lm["names"]) and qat_scheme(m) == "int8"
    assert int8_lm["full"]["integer_matmuls"] == int8_lm["full"]["quantized_linears"] == 15  # 2 layers x 7 + the head
    assert int8_lm["full"]["int8_embeddings"] == 1


@pytest.mark.parametrize("kind", ["full", "kv", "fused"])
def test_every_onnxruntime_graph_stores_the_table_as_int8_rows_with_one_scale_each(int8_lm, kind):
    from onnx import numpy_helper

    path = {"full": int8_lm["dir"] / "q.onnx", "kv": int8_lm["dir"] / "q.kv.onnx", "fused": int8_lm["dir"] / "q.fused.onnx"}[kind]
    g = _graph(path).graph
    q, s = (t.numpy() for t in int8_lm["model"].model.embed_tokens.integer_table())
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    tables = [n for n, a in inits.items() if a.dtype == np.int8 and a.shape == q.shape and np.array_equal(a, q)]
    assert len(tables) == 1, "the int8 table, stored once"
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] == tables[0]]
    assert len(gathers) == 1
    scale = [n for n in g.node if n.op_type == "Gather" and n.input[1] == gathers[0].input[1] and n is not gathers[0]]
    assert len(scale) == 1 and np.array_equal(inits[scale[0].input[0]][:, 0], s)
    # no float copy of the table is left, and no float head: no MatMul reads a weight (only attention's activations)
    assert not any(a.dtype == np.float32 and a.size >= q.size for a in inits.values())
    assert not [n.name for n in g.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm") and set(n.input) & set(inits)]


def test_int8_rows_lookup_is_the_fake_quant_bit_for_bit(int8_lm):
    """The graph's lookup (Gather of int8 rows and of their scales, Cast, Mul) gives exactly the QAT model's embedding."""
    import onnx
    from onnx import helper

    from dsk_compress.runtimes.onnxruntime import make_session

    emb = int8_lm["model"].model.embed_tokens
    g = _graph(int8_lm["dir"] / "q.fused.onnx").graph
    keep = {"embed_tokens/Gather", "embed_tokens/GatherScale", "embed_tokens/Cast", "embed_tokens/Mul"}
    nodes = [n for n in g.node if n.name in keep]
    assert len(nodes) == 4
    used = {i for n in nodes for i in n.input}
    sub = helper.make_graph(
        nodes,
        "emb",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
        [t for t in g.initializer if t.name in used],
    )
    path = int8_lm["dir"] / "emb.onnx"
    onnx.save(helper.make_model(sub, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    ids = np.arange(VOCAB, dtype=np.int64)[None]
    got = make_session(path).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = emb(torch.as_tensor(ids)).numpy()
    np.testing.assert_array_equal(got, want)


def test_int8_graphs_match_the_fake_quant_model(int8_lm):
    assert int8_lm["full"]["sqnr_db_vs_fake_quant"] > 60  # seen: 136 dB
    assert int8_lm["kv"]["tokens_match"] and int8_lm["kv"]["step_logits_sqnr_db"] > 60


def test_the_int8_embedding_and_head_make_the_graph_much_smaller(int8_lm, tmp_path):
    """With vocabulary 256 and hidden 64 the table and head are half the weights; int8 stores them in a quarter."""
    from dsk_compress.compress.qat import calibrate, freeze_for_export, prepare_qat
    from dsk_compress.export.int8 import export_int8_lm

    m = tiny_llama()
    prepare_qat(m, 8, True, ["lm_head"], activations="symmetric")  # float table and head, as before
    calibrate(m, [torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1)) for _ in range(3)])
    freeze_for_export(m)
    export_int8_lm(m, int8_lm["x"], tmp_path / "f.qdq.onnx", tmp_path / "f.onnx", min_sqnr_db=30)
    small, big = (int8_lm["dir"] / "q.onnx").stat().st_size, (tmp_path / "f.onnx").stat().st_size
    hidden = m.config.hidden_size
    assert big - small >= 2 * VOCAB * hidden * 3 * 0.95  # two [V, H] float tables became int8: 3 bytes per weight saved


def test_a_saved_int8_qat_model_with_an_int8_embedding_loads_back(int8_lm, tmp_path):
    from dsk_compress.compress.qat import QuantEmbedding, load_qat_model, qat_info, save_qat_model

    m = int8_lm["model"]
    p = save_qat_model(m, tmp_path / "q", qat_info(m, 8, True, "symmetric", [], int8_lm["names"], embedding_bits=8))
    back = load_qat_model(p)
    assert isinstance(back.model.embed_tokens, QuantEmbedding)
    x = torch.as_tensor(int8_lm["x"])
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, m(input_ids=x).logits)


def test_ptq_baselines_quantize_the_head_when_qat_does(tmp_path):
    from dsk_compress.export.onnx import export_causal_lm
    from dsk_compress.export.ptq import _weight_matmuls

    src = export_causal_lm(tiny_llama(), np.zeros((1, 16), np.int64), tmp_path / "fp32.onnx")
    with_head = _weight_matmuls(src, tmp_path / "a.onnx", head=True)
    without = _weight_matmuls(src, tmp_path / "b.onnx", head=False)
    assert len(without) == 14 and len(with_head) == 15 and set(without) < set(with_head)


def test_qat_stage_head_default_and_skip():
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.recipes.stages.export import _qat_quantizes_head

    base = {"name": "r", "teacher": {"zoo": "code-lm-moe"}, "student": {"from_teacher": {"layers": [0]}}, "task": {"name": "code-lm"}}
    spec = RecipeSpec.model_validate({**base, "stages": [{"stage": "qat"}, {"stage": "export"}]})
    assert spec.stages[0].embedding_bits == 8 and _qat_quantizes_head(spec)
    spec = RecipeSpec.model_validate({**base, "stages": [{"stage": "qat", "skip": ["lm_head"]}, {"stage": "export"}]})
    assert not _qat_quantizes_head(spec)


# --------------------------------------------------------------------------- the fused graph as the full-sequence model


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fused_full_sequence_scores_a_batch_like_the_full_graph(int8_lm, tmp_path, precision):
    from dsk_compress.export.fused import export_fused
    from dsk_compress.export.onnx import export_causal_lm
    from dsk_compress.runtimes.decoder import FusedFullSequence
    from dsk_compress.runtimes.onnxruntime import make_session

    x = np.random.default_rng(3).integers(0, VOCAB, (5, 24))
    if precision == "fp32":
        m = tiny_llama()
        full, fused = export_causal_lm(m, x[:1], tmp_path / "m.onnx"), export_fused(m, tmp_path / "m.fused.onnx")
    else:
        full, fused = int8_lm["dir"] / "q.onnx", int8_lm["dir"] / "q.fused.onnx"
    f = FusedFullSequence(make_session(fused))
    want = make_session(full).run(None, {"input_ids": x})[0]
    got = f(x)
    assert got.shape == want.shape
    if precision == "fp32":
        np.testing.assert_allclose(got, want, atol=1e-4)
    else:  # int8: a different summation order can flip one rounding of an activation; argmax agrees
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    # each row is its own sequence from an empty cache: the batch changes nothing, and the kept buffers neither
    np.testing.assert_array_equal(f(x[2:3])[0], got[2])
    np.testing.assert_array_equal(f(x)[4], got[4])


def test_fused_full_sequence_refuses_a_plain_graph_and_overlong_windows(tmp_path):
    from dsk_compress.export.fused import export_fused
    from dsk_compress.export.onnx import export_causal_lm
    from dsk_compress.runtimes.decoder import DecoderError, FusedFullSequence
    from dsk_compress.runtimes.onnxruntime import make_session

    m = tiny_llama()
    with pytest.raises(DecoderError, match="not a fused decoder graph"):
        FusedFullSequence(make_session(export_causal_lm(m, np.zeros((1, 8), np.int64), tmp_path / "m.onnx")))
    f = FusedFullSequence(make_session(export_fused(m, tmp_path / "m.fused.onnx")))
    with pytest.raises(DecoderError, match="exceed the model's"):
        f(np.zeros((1, f.layout.max_positions + 1), np.int64))


class _Art:
    def __init__(self, fused=None, kv=None):
        self.fused_path, self.kv_cache_path = fused, kv


@pytest.mark.parametrize(
    "device, want",
    [
        ("rpi5", ["model.fused.onnx"]),  # CPU-only onnxruntime: the fused graph alone
        ("rpi4", ["model.fused.onnx"]),
        ("jetson-orin-nano", ["model.onnx", "model.fused.onnx", "model.kv.onnx"]),  # TensorRT builds from model.onnx
        ("gpu-server", ["model.onnx", "model.fused.onnx", "model.kv.onnx"]),
    ],
)
def test_a_cpu_bundle_ships_one_copy_of_the_weights(tmp_path, device, want):
    from dsk_compress.devices import load_device
    from dsk_compress.export.bundle import graph_copies

    for n in ("full.onnx", "dec.fused.onnx", "dec.kv.onnx"):
        (tmp_path / n).write_bytes(b"x")
    prof = load_device(device)
    runtime = "tensorrt" if prof.preferred_runtime == "tensorrt" else "onnxruntime"
    got = graph_copies(tmp_path, _Art("dec.fused.onnx", "dec.kv.onnx"), tmp_path / "full.onnx", "final", prof, runtime)
    assert list(got) == want
    # without a fused graph every device gets the full-sequence graph (and the KV graph for decoding)
    got = graph_copies(tmp_path, _Art(None, "dec.kv.onnx"), tmp_path / "full.onnx", "final", prof, runtime)
    assert list(got) == ["model.onnx", "model.kv.onnx"]
