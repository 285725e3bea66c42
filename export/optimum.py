"""Model folders for Hugging Face Optimum: ``ORTModelForCausalLM.from_pretrained(folder).generate(...)``.

What ``optimum.onnxruntime.ORTModelForCausalLM`` (optimum-onnx 0.1.0, ``modeling_decoder.py``) reads from a folder:
``config.json`` (``AutoConfig``: ``model_type``, ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
``use_cache``), ``generation_config.json`` (else one made from the config) and ``model.onnx``, a decoder with past key
values in the layout of Optimum's own ``text-generation-with-past`` exports::

    inputs   input_ids [batch, sequence], attention_mask [batch, past + sequence], position_ids [batch, sequence],
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    outputs  logits [batch, sequence, vocab], present.{i}.key / .value [batch, kv_heads, past + sequence, head_dim]

Its first call feeds an empty past it sizes itself, ``[batch, num_key_value_heads, 0, hidden_size // num_attention_heads]``
(``head_dim`` from the config only for Gemma-like types), then feeds each call's present back as the next past.

Our fused decoder graph with an attention mask and position ids (:func:`dsk_compress.export.genai.attention_mask_graph`)
has that interface: GroupQueryAttention grows the cache when past and present are separate tensors. A student without a
fused graph ships its plain KV-cache graph (the same layout without ``position_ids``: it derives positions from the mask;
Optimum then logs that the model is "legacy" and works the same).

Nothing here imports transformers or optimum: ``config.json`` is the student's own, with ``use_cache`` set and
``rope_theta`` written beside transformers 5's ``rope_parameters`` (the graph applies the rotary embedding itself; the keys
only keep every transformers version's config class content), so the folder is the same whichever transformers the
exporting or the loading side has (optimum-onnx 0.1.0 needs transformers < 4.58; the project runs 5.x).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files
from dsk_compress.export.genai import DecoderSource, attention_mask_graph

OPTIMUM_TESTED = "optimum-onnx 0.1.0 (optimum 2.1.0, transformers 4.57.6)"
HEAD_DIM_TYPES = frozenset({"gemma", "gemma3_text", "gpt_oss", "nemotron"})
"""Model types whose empty cache optimum-onnx 0.1.0 sizes with ``config.head_dim`` (every other: hidden_size // heads)."""
KV_HEAD_TYPES = frozenset(
    {
        "arcee",
        "deepseek_v3",
        "cohere",
        "gemma",
        "gemma3_text",
        "glm",
        "granite",
        "gpt_oss",
        "helium",
        "mistral",
        "llama",
        "nemotron",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "stablelm",
    }
)
"""Model types whose cache heads optimum-onnx 0.1.0 reads from ``num_key_value_heads`` (every other: num_attention_heads)."""


def optimum_cache_shape(config: dict[str, Any]) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of the empty cache optimum-onnx 0.1.0's ORTModelForCausalLM feeds first, from ``config``."""
    mt = config.get("model_type")
    heads = int(config.get("num_attention_heads") or 0)
    kv = int(config.get("num_key_value_heads") or heads) if mt in KV_HEAD_TYPES else heads
    dim = int(config.get("head_dim") or 0) if mt in HEAD_DIM_TYPES else int(config.get("hidden_size") or 0) // max(heads, 1)
    return kv, dim


def check_optimum(src: DecoderSource) -> None:
    """Refuse (ExportError) a model whose cache Optimum would size differently from the graph's."""
    kv, dim = optimum_cache_shape(src.config)
    want = (src.shape["kv_heads"], src.shape["head_dim"])
    if (kv, dim) != want:
        mt = src.config.get("model_type")
        raise ExportError(
            f"Optimum's ORTModelForCausalLM sizes the cache of a {mt} model as {kv} heads x {dim} "
            f"({'num_key_value_heads' if mt in KV_HEAD_TYPES else 'num_attention_heads'}, "
            f"{'head_dim' if mt in HEAD_DIM_TYPES else 'hidden_size // num_attention_heads'}), and this student's cache is "
            f"{want[0]} heads x {want[1]} (head pruning keeps head_dim and hidden_size)",
            hint="--format genai has no such limit; or prune with head_ratio: 0",
        )


def optimum_config(src: DecoderSource) -> dict[str, Any]:
    """The folder's ``config.json``: the student's config with ``use_cache``, fp32 and the special token ids."""
    cfg = {k: v for k, v in src.config.items() if k not in ("quantization_config", "_name_or_path")}
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg.update(use_cache=True, bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id)
    cfg.setdefault("torch_dtype", "float32")
    return cfg


def write_optimum(src: DecoderSource, folder: Path) -> list[str]:
    """Write an Optimum ``ORTModelForCausalLM`` folder for ``src`` into ``folder`` (an empty staging folder); return the file names."""
    check_optimum(src)
    if src.kind == "fused":
        graph_files.save(attention_mask_graph(src.graph, position_ids=True), folder / "model.onnx", check=False)
    else:
        graph_files.copy(src.graph, folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps(optimum_config(src), indent=2) + "\n")
    gen = {"bos_token_id": src.bos_token_id, "eos_token_id": src.eos_token_id, "pad_token_id": src.pad_token_id, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    src.write_tokenizer(folder)
    (folder / "README.md").write_text(_readme(src))
    return sorted(p.name for p in folder.iterdir())


def _readme(src: DecoderSource) -> str:
    prompt = "def " if src.byte_level else "The "
    return (
        f"# {src.variant} ({src.precision}) for Hugging Face Optimum\n\n"
        f"Written by `dsk-compress export {src.run_name} --format optimum` from the run's "
        f"{'fused decoder graph' if src.kind == 'fused' else 'KV-cache decoder graph'}: the same model `run.py --generate` of a "
        f"deploy bundle decodes, with the same greedy tokens. Tested with {OPTIMUM_TESTED}.\n\n"
        "```python\nfrom optimum.onnxruntime import ORTModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
        'model = ORTModelForCausalLM.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
        f'ids = tokenizer({prompt!r}, return_tensors="pt")\n'
        "out = model.generate(**ids, max_new_tokens=64, do_sample=False)\nprint(tokenizer.decode(out[0]))\n```\n\n"
        + (
            "The tokenizer maps each UTF-8 byte to its own id (this model reads bytes: vocabulary 256; byte 0, never in its "
            "training text, stands for end-of-text). "
            if src.byte_level
            else ""
        )
        + "Batch 1, or prompts of equal length without padding: the graph's attention takes each row's token count from the mask.\n"
    )
