"""onnxruntime-genai folders (export.genai): the attention-mask decoder graph decodes exactly as our fused decoder, and genai's own
generation loop, loading the folder, picks the same greedy tokens as our decoder for fp32, int8 (QAT), int4 and plain KV graphs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import qat_llama, tiny_llama

NEW = 32
PROMPT = np.random.default_rng(0).integers(1, 256, 12)  # no byte 0: genai's pad id (a 0 in a prompt is masked out)


def _source(graph: Path, model, kind: str, variant: str = "v", precision: str = "fp32"):
    from dsk_compress.export.genai import DecoderSource, decoder_shape

    cfg = model.config.to_dict()
    shape = decoder_shape(graph)
    shape["heads"] = shape["heads"] or cfg["num_attention_heads"]
    return DecoderSource(
        variant=variant, precision=precision, kind=kind, graph=graph, config=cfg, shape=shape, run_name="run", byte_level=True
    )


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Decoder graphs of tiny Llamas with grouped-query attention: fused fp32 / int4 / int8 (QAT, 4 LSQ steps) and a plain
    KV-cache graph, each with the model it came from."""
    from dsk_compress.compress.qat import freeze_for_export
    from dsk_compress.export.fused import export_fused
    from dsk_compress.export.kv_cache import export_float_with_past

    d = tmp_path_factory.mktemp("genai-graphs")
    m = tiny_llama(num_key_value_heads=2)
    q, _, _ = qat_llama(train_steps=4, num_key_value_heads=2)
    freeze_for_export(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of transformers' cache code
        kv = export_float_with_past(m, d / "m.kv.onnx")
    return {
        "fp32": (export_fused(m, d / "m.fused.onnx"), m, "fused"),
        "int4": (export_fused(m, d / "m.int4.onnx", "int4"), m, "fused"),
        "int8": (export_fused(q, d / "q.fused.onnx", "int8"), q, "fused"),
        "kv": (kv, m, "kv"),
    }


def _ours(path: Path, kind: str) -> list[int]:
    """Our decoder's greedy tokens (what a bundle's run.py --generate runs), the first from the prompt's logits."""
    from dsk_compress.runtimes.decoder import FusedDecoderSession, KVCacheSession

    return (FusedDecoderSession if kind == "fused" else KVCacheSession)(path).greedy(PROMPT, NEW)[0].tolist()


def test_attention_mask_graph_swaps_seqlens_for_the_mask_and_nothing_else(graphs):
    import onnx

    from dsk_compress.export.genai import attention_mask_graph

    path = graphs["fp32"][0]
    src, m = onnx.load(str(path)), attention_mask_graph(path, position_ids=True)
    names = [i.name for i in m.graph.input]
    assert (
        names[:3] == ["input_ids", "attention_mask", "position_ids"] and "seqlens_k" not in names and "total_sequence_length" not in names
    )
    assert [i.name for i in src.graph.input if i.name.startswith("past")] == [n for n in names if n.startswith("past")]
    added = [n.op_type for n in m.graph.node][: len(m.graph.node) - len(src.graph.node)]
    assert added == ["ReduceSum", "Sub", "Cast", "Shape", "Squeeze", "Cast"]
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.input[9] == "position_ids" for n in gqa)
    assert {p.key for p in m.metadata_props} == {"dsk_compress.decoder"}  # our FusedDecoderSession refuses it


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_attention_mask_graph_with_a_growing_cache_gives_the_fused_graphs_logits_exactly(graphs, tmp_path, precision):
    """Optimum's way to drive it: the present fed back as the next past, the mask one longer each step."""
    import onnxruntime as ort

    from dsk_compress.export import graph_files
    from dsk_compress.export.genai import attention_mask_graph
    from dsk_compress.runtimes.decoder import FusedDecoderSession

    path = graphs[precision][0]
    masked = graph_files.save(attention_mask_graph(path, position_ids=True), tmp_path / "m.onnx", check=False)
    ref_tokens = _ours(path, "fused")
    ref_logits = FusedDecoderSession(path).step_logits(PROMPT, np.asarray(ref_tokens[:-1]))
    s = ort.InferenceSession(str(masked), providers=["CPUExecutionProvider"])
    outs = [o.name for o in s.get_outputs()]
    past = {i.name: np.zeros((1, 2, 0, 16), np.float32) for i in s.get_inputs() if i.name.startswith("past")}
    ids, total, toks, logits = PROMPT[None].astype(np.int64), PROMPT.size, [], []
    for _ in range(NEW):
        r = dict(
            zip(
                outs,
                s.run(
                    None,
                    {
                        "input_ids": ids,
                        "attention_mask": np.ones((1, total), np.int64),
                        "position_ids": np.arange(total - ids.shape[1], total)[None],
                        **past,
                    },
                ),
            )
        )
        logits.append(r["logits"][0, -1])
        toks.append(int(np.argmax(logits[-1])))
        past = {k.replace("present.", "past_key_values."): v for k, v in r.items() if k.startswith("present.")}
        ids, total = np.array([[toks[-1]]]), total + 1
    assert toks == ref_tokens
    np.testing.assert_array_equal(np.stack(logits), ref_logits)  # the same kernels on the same numbers: atol 0
    assert r["present.0.key"].shape == (1, 2, PROMPT.size + NEW - 1, 16)


@pytest.mark.parametrize("which", ["fp32", "int8", "int4", "kv"])
def test_genai_loads_the_folder_and_its_greedy_tokens_equal_our_decoders(graphs, tmp_path, which):
    og = pytest.importorskip("onnxruntime_genai")
    from dsk_compress.export.genai import write_genai

    path, model, kind = graphs[which]
    files = write_genai(_source(path, model, kind), tmp_path)
    assert files == ["README.md", "genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is (kind == "fused") and cfg["model"]["type"] == "decoder"
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2 and cfg["model"]["decoder"]["head_size"] == 16
    gm = og.Model(str(tmp_path))
    params = og.GeneratorParams(gm)
    params.set_search_options(do_sample=False, max_length=PROMPT.size + NEW, min_length=PROMPT.size + NEW)
    gen = og.Generator(gm, params)
    gen.append_tokens(PROMPT.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    got = [int(t) for t in gen.get_sequence(0)[PROMPT.size :]]
    assert got == _ours(path, kind)
    assert len(set(got)) > 3  # a random model: not one repeated token (the comparison means something)


def test_byte_level_tokenizer_is_utf8_bytes_in_genai_and_transformers(graphs, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    from dsk_compress.export.genai import write_genai

    path, model, kind = graphs["fp32"]
    write_genai(_source(path, model, kind), tmp_path)
    text = "def f(x):\n\treturn x + 1  # é ✓\n"
    want = list(text.encode("utf-8"))
    tok = og.Tokenizer(og.Model(str(tmp_path)))
    assert [int(t) for t in tok.encode(text)] == want and tok.decode(np.asarray(want, np.int32)) == text
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == want and hf.decode(want) == text


def test_optimum_refuses_a_cache_it_would_size_wrongly(graphs):
    from dsk_compress.errors import ExportError
    from dsk_compress.export.optimum import check_optimum, optimum_cache_shape

    path, model, kind = graphs["fp32"]
    src = _source(path, model, kind)
    assert optimum_cache_shape(src.config) == (2, 16)
    check_optimum(src)
    src.config = {**src.config, "num_attention_heads": 2}  # head pruning: 2 heads of 16 in a width of 64
    with pytest.raises(ExportError, match="2 heads x 32.*2 heads x 16"):
        check_optimum(src)


def test_text_lm_folder_ships_the_teachers_tokenizer_and_its_special_ids(tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from conftest import bpe_tokenizer
    from transformers import AutoTokenizer

    from dsk_compress.export.fused import export_fused
    from dsk_compress.export.genai import DecoderSource, decoder_shape, write_genai

    tok = bpe_tokenizer(["The quick brown fox jumps over the lazy dog. " * 3, "def main():\n    print('hello world')\n"] * 20, 300)
    tok.save_pretrained(tmp_path / "tok")
    m = tiny_llama(vocab_size=300)
    graph = export_fused(m, tmp_path / "m.onnx")
    src = DecoderSource(
        variant="v",
        precision="fp32",
        kind="fused",
        graph=graph,
        config=m.config.to_dict(),
        shape={**decoder_shape(graph), "heads": 4},
        run_name="run",
        byte_level=False,
        tokenizer_dir=tmp_path / "tok",
        special={"bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": None},
    )
    write_genai(src, tmp_path / "genai")
    cfg = json.loads((tmp_path / "genai" / "genai_config.json").read_text())["model"]
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == tok.eos_token_id == 1 and cfg["vocab_size"] == 300
    text = "The lazy fox prints hello world"
    want = tok(text)["input_ids"]
    gt = og.Tokenizer(og.Model(str(tmp_path / "genai")))
    assert [int(t) for t in gt.encode(text)] == want and gt.decode(np.asarray(want, np.int32)) == text
    assert AutoTokenizer.from_pretrained(tmp_path / "genai")(text)["input_ids"] == want
