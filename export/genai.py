"""Model folders for onnxruntime-genai: ``genai_config.json``, the decoder graph with the interface genai drives, tokenizer files.

onnxruntime-genai (``og.Model(folder)``: its C++ generation loop, search and sampling, on x86, arm64 and CUDA) runs a
"decoder" graph with these inputs and outputs (its ``config.h`` defaults, the names its own model builder writes)::

    inputs   input_ids                    int64 [batch, sequence]
             attention_mask               int64 [batch, total_sequence]      1 for every token so far, this call's included
             past_key_values.{i}.key / .value   float [batch, kv_heads, past_or_max_sequence, head_dim]
    outputs  logits                       float [batch, sequence, vocab]
             present.{i}.key / .value

With ``search.past_present_share_buffer`` true genai preallocates one ``max_length`` buffer per cache tensor and binds
it as both past and present (GroupQueryAttention appends in place); false, it feeds each step's present back as the
next past (a growing cache).

Our fused decoder graph (:mod:`dsk_compress.export.fused`) is already GroupQueryAttention on shared buffers; it takes
``seqlens_k`` and ``total_sequence_length`` where genai gives an attention mask. :func:`attention_mask_graph` puts the
mask in their place: ``seqlens_k = ReduceSum(attention_mask, 1) - 1`` and ``total_sequence_length = attention_mask.shape[1]``
(what genai's builder writes in its own graphs), and nothing else in the graph changes, so genai's loop computes the
very logits our decoder does. The same graph also runs with a growing cache (GroupQueryAttention copies the past into
a present of the total length), which is how Hugging Face Optimum drives it (:mod:`dsk_compress.export.optimum`).
A plain KV-cache graph (:mod:`dsk_compress.export.kv_cache`, for students the fused builder refuses) has genai's
interface as it is and runs with ``past_present_share_buffer`` false.

Tokenizers: genai reads ``tokenizer.json`` + ``tokenizer_config.json`` (Hugging Face ``tokenizers`` format). A text-lm
run ships its teacher's tokenizer; the byte-level code-lm task (vocabulary 256, token = byte value, no tokenizer of
its own) ships :func:`byte_tokenizer_json`, a BPE with no merges over GPT-2's byte alphabet, which genai's and
``tokenizers``' ByteLevel code paths encode and decode byte for byte (UTF-8 text in, the same bytes as ids out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files
from dsk_compress.runtimes.decoder import INPUT_IDS, METADATA_KEY, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, past_names

ATTENTION_MASK, POSITION_IDS = "attention_mask", "position_ids"
GENAI_TESTED = "0.18.0"
"""The onnxruntime-genai release the folders are tested with (CI loads one and compares its greedy tokens with ours)."""
GENAI_FLOOR = "0.18"
"""The README's floor: the release tested (the generic ``decoder`` type exists since 0.6, but older releases bring older
ONNX Runtimes, untested with these contrib ops)."""
MODEL_TYPE = "decoder"
"""genai's generic decoder-only LLM type: the graph holds the whole model, so none of genai's per-family behaviour applies."""
BYTE_LEVEL_EOS = 0
"""End-of-text id given to runtimes that need one for the byte-level code-lm vocabulary (it has none): byte 0 (NUL),
which never occurs in the Python source it is trained on."""


@dataclass
class DecoderSource:
    """One variant's decoder graph and what a runtime's folder says about it (read from a run by
    :func:`dsk_compress.export.runtime_folders.decoder_source`)."""

    variant: str
    precision: str
    kind: str  # "fused" or "kv"
    graph: Path
    config: dict[str, Any]  # the student's Hugging Face config.json
    shape: dict[str, int]  # export.genai.decoder_shape, heads completed from the config
    run_name: str
    byte_level: bool
    tokenizer_dir: Path | None = None  # text-lm: the teacher's tokenizer folder
    special: dict[str, int | None] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.config.get("hidden_size") or self.shape["heads"] * self.shape["head_dim"])

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or 2048)

    @property
    def bos_token_id(self) -> int:
        return self._id("bos_token_id")

    @property
    def eos_token_id(self) -> int:
        return self._id("eos_token_id")

    @property
    def pad_token_id(self) -> int:
        return self._id("pad_token_id", self._id("eos_token_id"))

    def _id(self, key: str, default: int = BYTE_LEVEL_EOS) -> int:
        v = self.special.get(key)
        return int(v) if v is not None else default

    def write_tokenizer(self, folder: Path) -> None:
        """``tokenizer.json`` + ``tokenizer_config.json`` in the ``tokenizers`` format that genai and transformers 4.x and 5.x all
        read (``PreTrainedTokenizerFast``, written here rather than by the installed transformers so the folder does not
        depend on its version)."""
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.context_length,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
        }
        if self.byte_level:
            byte_tokenizer_json(folder / "tokenizer.json")
        else:
            from dsk_compress.tasks.text_lm import load_tokenizer

            tok = load_tokenizer(self.tokenizer_dir)
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is None:
                raise ExportError(
                    "the teacher's tokenizer is a slow (Python) one; genai and Optimum folders ship a tokenizers tokenizer.json",
                    hint="give the teacher a fast tokenizer (tokenizer.json beside its config)",
                )
            backend.save(str(folder / "tokenizer.json"))
            cfg.update({k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)})
            for key in ("add_bos_token", "add_eos_token"):
                if isinstance(getattr(tok, key, None), bool):
                    cfg[key] = getattr(tok, key)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def attention_mask_graph(fused_path: str | Path, *, position_ids: bool = False):
    """The fused decoder graph at ``fused_path`` with an ``attention_mask`` input in place of ``seqlens_k`` and
    ``total_sequence_length`` (see the module docstring), as an ``onnx.ModelProto``.

    ``position_ids`` (int64 ``[batch, sequence]``, what Optimum's exports of Llama-family models take) also becomes an input,
    fed to each GroupQueryAttention's rotary embedding; ONNX Runtime's CPU kernel reads it for the decode steps and only
    its first element for a prompt, so batch 1 (or right-padded batches) decode the same as without it.
    """
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(fused_path))
    g = m.graph
    names = [i.name for i in g.input]
    if SEQLENS_K not in names or TOTAL_SEQUENCE_LENGTH not in names:
        raise ExportError(
            f"{Path(fused_path).name} is not a fused decoder graph (no {SEQLENS_K} / {TOTAL_SEQUENCE_LENGTH} inputs)",
            hint="export it with dsk_compress.export.fused",
        )
    if ATTENTION_MASK in names:
        raise ExportError(f"{Path(fused_path).name} already has an {ATTENTION_MASK} input")
    kept = [i for i in g.input if i.name not in (SEQLENS_K, TOTAL_SEQUENCE_LENGTH)]
    new = [helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence_length"])]
    if position_ids:
        new.append(helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch", "sequence"]))
    ids = next(k for k, i in enumerate(kept) if i.name == INPUT_IDS)
    kept[ids + 1 : ids + 1] = new
    for vi in kept:  # the cache length is genai's max_length (shared buffers) or the past length (growing cache)
        if vi.name.startswith("past_key_values."):
            vi.type.tensor_type.shape.dim[2].dim_param = "past_sequence_length"
    for vi in g.output:
        if vi.name.startswith("present."):
            vi.type.tensor_type.shape.dim[2].dim_param = "present_sequence_length"
    one = "attention_mask/one"
    g.initializer.append(helper.make_tensor(one, TensorProto.INT64, [1], [1]))
    head = [
        helper.make_node("ReduceSum", [ATTENTION_MASK, one], ["attention_mask/sum"], name="attention_mask/ReduceSum", keepdims=0),
        helper.make_node("Sub", ["attention_mask/sum", one], ["attention_mask/seqlens"], name="attention_mask/Sub"),
        helper.make_node("Cast", ["attention_mask/seqlens"], [SEQLENS_K], name="attention_mask/Cast_seqlens_k", to=TensorProto.INT32),
        helper.make_node("Shape", [ATTENTION_MASK], ["attention_mask/length"], name="attention_mask/Shape", start=1, end=2),
        helper.make_node("Squeeze", ["attention_mask/length"], ["attention_mask/total"], name="attention_mask/Squeeze"),
        helper.make_node(
            "Cast",
            ["attention_mask/total"],
            [TOTAL_SEQUENCE_LENGTH],
            name="attention_mask/Cast_total_sequence_length",
            to=TensorProto.INT32,
        ),
    ]
    if position_ids:
        for n in g.node:
            if n.op_type == "GroupQueryAttention":
                ins = list(n.input) + [""] * max(0, 10 - len(n.input))
                ins[9] = POSITION_IDS  # GroupQueryAttention's optional position_ids input (rotary positions)
                del n.input[:]
                n.input.extend(ins)
    nodes = head + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend(kept)
    props = {p.key: p.value for p in m.metadata_props}
    layout = json.loads(props.pop(METADATA_KEY, "{}"))
    layout["interface"] = "attention_mask" + (" + position_ids" if position_ids else "")
    props["dsk_compress.decoder"] = json.dumps(layout)  # not METADATA_KEY: our FusedDecoderSession cannot drive this graph
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, props)
    return m


def decoder_shape(path: str | Path) -> dict[str, int]:
    """``layers``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab`` of a decoder graph (fused or plain KV) read from its interface
    (and, for the heads of a fused graph, its GroupQueryAttention nodes); a cache whose layers differ is refused."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    dims = {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in [*m.graph.input, *m.graph.output]
    }
    n = 0
    while past_names(n)[0] in dims:
        n += 1
    if n == 0:
        raise ExportError(f"{Path(path).name} has no past_key_values.0.key input: it is not a decoder graph")
    shapes = {(dims[k][1], dims[k][3], dims[v][3]) for k, v in (past_names(i) for i in range(n))}
    if len(shapes) != 1 or None in next(iter(shapes)):
        raise ExportError(
            f"{Path(path).name}: the cache's heads / widths differ between layers or are not static ({sorted(shapes, key=str)})",
            hint="onnxruntime-genai and Optimum size every layer's cache alike",
        )
    kv, kdim, vdim = next(iter(shapes))
    if kdim != vdim:
        raise ExportError(
            f"{Path(path).name}: keys ({kdim}) and values ({vdim}) differ in width (MLA attention)",
            hint="onnxruntime-genai and Optimum give keys and values one head size",
        )
    heads = {a.i for node in m.graph.node if node.op_type == "GroupQueryAttention" for a in node.attribute if a.name == "num_heads"}
    return {
        "layers": n,
        "heads": heads.pop() if len(heads) == 1 else 0,
        "kv_heads": kv,
        "head_dim": kdim,
        "vocab": dims.get("logits", [None, None, 0])[2] or 0,
    }


def genai_config(src: DecoderSource, filename: str, share_buffer: bool) -> dict[str, Any]:
    """The ``genai_config.json`` of a folder whose decoder graph is ``filename`` (search defaults: greedy, as genai's builder
    writes them; ``max_length`` = the model's positions)."""
    s = src.shape
    inputs = {
        "input_ids": INPUT_IDS,
        "attention_mask": ATTENTION_MASK,
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    return {
        "model": {
            "bos_token_id": src.bos_token_id,
            "context_length": src.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": s["head_dim"],
                "hidden_size": src.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": s["heads"],
                "num_hidden_layers": s["layers"],
                "num_key_value_heads": s["kv_heads"],
            },
            "eos_token_id": src.eos_token_id,
            "pad_token_id": src.pad_token_id,
            "type": MODEL_TYPE,
            "vocab_size": s["vocab"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": src.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def write_genai(src: DecoderSource, folder: Path) -> list[str]:
    """Write an onnxruntime-genai model folder for ``src`` into ``folder`` (an empty staging folder); return the file names.

    The fused graph becomes :func:`attention_mask_graph` (shared buffers); a plain KV graph is copied as it is (growing cache).
    """
    if src.kind == "fused":
        graph_files.save(attention_mask_graph(src.graph), folder / "model.onnx", check=False)  # contrib ops: the ORT load checks it
    else:
        graph_files.copy(src.graph, folder / "model.onnx")
    cfg = genai_config(src, "model.onnx", share_buffer=src.kind == "fused")
    (folder / "genai_config.json").write_text(json.dumps(cfg, indent=4) + "\n")
    src.write_tokenizer(folder)
    (folder / "README.md").write_text(_readme(src))
    return sorted(p.name for p in folder.iterdir())


def _readme(src: DecoderSource) -> str:
    prompt = "def " if src.byte_level else "The "
    enc = (
        "`tokenizer.encode(text)` gives the UTF-8 bytes of `text` as ids (this model reads bytes: vocabulary 256; byte 0, never "
        "in its training text, stands for end-of-text)"
        if src.byte_level
        else "`tokenizer.json` is the teacher's tokenizer"
    )
    return (
        f"# {src.variant} ({src.precision}) for onnxruntime-genai\n\n"
        f"Written by `dsk-compress export {src.run_name} --format genai` from the run's "
        f"{'fused decoder graph (GroupQueryAttention on shared KV buffers)' if src.kind == 'fused' else 'KV-cache decoder graph'}: "
        "the same model `run.py --generate` of a deploy bundle decodes, with the same greedy tokens.\n\n"
        f"```bash\npip install 'onnxruntime-genai>={GENAI_FLOOR}'   # tested with {GENAI_TESTED}\n```\n\n"
        "```python\nimport onnxruntime_genai as og\n\n"
        'model = og.Model("path/to/this/folder")\ntokenizer = og.Tokenizer(model)\n'
        "params = og.GeneratorParams(model)\nparams.set_search_options(do_sample=False, max_length=96)\n"
        f"gen = og.Generator(model, params)\ngen.append_tokens(tokenizer.encode({prompt!r}))\n"
        "while not gen.is_done():\n    gen.generate_next_token()\nprint(tokenizer.decode(gen.get_sequence(0)))\n```\n\n"
        f"{enc}. Batch 1, or prompts of equal length: the graph's attention takes each row's token count from the mask.\n"
    )


def byte_tokenizer_json(path: str | Path) -> None:
    """A byte-level ``tokenizer.json`` (id = byte value) for the byte-level code-lm vocabulary: BPE without merges over GPT-2's
    printable stand-ins for the 256 bytes, ByteLevel pre-tokenizer and decoder (no regex split, no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's printable stand-ins for bytes, the alphabet of the ByteLevel pre-tokenizer
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    vocab = {chr(b) if b in printable else chr(next(extra)): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


__all__ = ["DecoderSource", "attention_mask_graph", "byte_tokenizer_json", "decoder_shape", "genai_config", "write_genai"]
