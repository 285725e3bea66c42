"""Decoder graphs built directly from ONNX Runtime's fused contrib operators (fp32, int8 from QAT, int4 weight-only).

The graph is written node by node from the Hugging Face module tree, not traced, so every fusion is ours
and none depends on what the ORT optimizer happens to match. Per decoder layer::

    SkipSimplifiedLayerNormalization        residual add + RMSNorm in one kernel (the first layer: SimplifiedLayerNormalization)
    q/k/v projections                       one MatMul on the concatenated weight (packed QKV) where the precision allows
    GroupQueryAttention (com.microsoft)     rotary embedding (do_rotary, cos/sin caches), KV-cache append, causal softmax
    o_proj
    SkipSimplifiedLayerNormalization
    gate/up projections                     one MatMul + Split where the precision allows
    QuickGelu(alpha=1) * up                 SiLU gate (QuickGelu with alpha 1 is x * sigmoid(x))
    down_proj

Graph interface, the same for every precision so one decode loop serves them::

    inputs   input_ids               int64 [batch, sequence]
             seqlens_k               int32 [batch]        tokens in the cache after this call, minus one
             total_sequence_length   int32 []             the same count + 1 (the longest row of the batch)
             past_key_values.{i}.key / .value   float [batch, kv_heads, max_sequence, head_dim]
    outputs  logits                  float [batch, sequence, vocab]
             present.{i}.key / .value  same shape as the past: bind the same buffer to both (GroupQueryAttention
                                       then appends in place; ``runtimes.decoder.FusedDecoderSession`` does this)

A prefill feeds the prompt with ``seqlens_k = len - 1``; each decode step feeds one token with the count
grown by one. ``max_sequence`` is the caller's buffer length (prompt + new tokens); positions are bounded
by the cos/sin caches (``max_position_embeddings``).

Linear layers by precision:

- ``fp32``: MatMul on ``W.T``; q/k/v and gate/up each become one MatMul on the concatenated weights.
- ``int8`` (a frozen QAT model, :mod:`dsk_compress.compress.qat`): each QuantLinear's activation quantizer
  becomes a static QuantizeLinear with its learned scale / zero point, its weight the int8 tensor that
  torch's per-channel fake quant rounds to (stored ``[in, out]``), and the product a
  MatMulIntegerToFloat (integer GEMM, then ``a_scale * w_scale[col]``). Linears reading the same tensor
  share one QuantizeLinear and one packed MatMul when their activation quantizers are equal: QAT shares one
  quantizer per input tensor by default (q/k/v, gate/up); a model trained with separate ones (a version-1
  ``qat.json``) keeps one MatMul per Linear. Linears QAT skipped stay fp32 MatMuls. An int8 embedding is a Gather of
  its int8 rows and one of their scales (Cast, Mul): standard operators, one float scale per row.
- ``int4`` of an int4 QAT model (:func:`dsk_compress.compress.qat.prepare_int4_qat`): each BlockQuantLinear a
  ``MatMulNBits`` (accuracy_level 4) packed from its own integers and learned scales (:mod:`dsk_compress.export.qat_graphs`);
  q/k/v and gate/up share one MatMulNBits where their bits and blocks agree (the kernel quantizes the input per row and
  block, independent of N, so packing along N is exact); the int8 embedding is one GatherBlockQuantized (8 bits, one scale per row).
- ``int4`` of a float model (post-training): the fp32 graph's MatMuls through ONNX Runtime's ``MatMulNBitsQuantizer``
  (blockwise symmetric RTN, ``block_size`` along K, activations fp32 or int8 per ``accuracy_level``).

Supported: dense Llama-family decoders (Llama, Mistral, Qwen2, Qwen3 with its per-head q/k norms) with a
SiLU-gated MLP and static rotary embeddings; anything else raises ExportError with a hint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files
from dsk_compress.runtimes.decoder import (  # the graph interface lives with the (torch-free) runtime that drives it
    INPUT_IDS,
    LOGITS,
    METADATA_KEY,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    FusedLayout,
    past_names,
    present_names,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

PRECISIONS = ("fp32", "int8", "int4")
INT8_KERNELS = ("static", "dynamic", "nbits")
"""int8 Linear kernels: ``static`` QuantizeLinear + MatMulIntegerToFloat (QAT's learned activation quantizers,
bit-compatible with its fake quant); ``dynamic`` DynamicQuantizeMatMul and ``nbits`` 8-bit MatMulNBits quantize
activations at run time (QAT's int8 weights, not its activation quantizers)."""
NBITS_BLOCK = 32


class _Graph:
    """A tiny ONNX graph writer: unique names, initializers from numpy, nodes in topological order."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self.names = [], [], set()

    def _fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def init(self, name: str, array) -> str:
        name = self._fresh(name)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        name = self._fresh(name)
        outs = [f"{name}/out{k}" for k in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.names.update(o for o in outs if o)
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs


def _float(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.detach().to(torch.float32).cpu().numpy()


def _act_quantizer(m) -> tuple[float, int, np.dtype]:
    """A QuantLinear's activation quantizer as ONNX QuantizeLinear parameters: (scale, zero point, integer dtype).

    Always uint8: a symmetric int8 quantizer (zero point 0, levels -128..127) is exactly the uint8 one with zero point
    128 (levels 0..255: the same grid, the same clamping), and ONNX Runtime's x86 integer GEMMs are fast for uint8
    activations only (int8 ones took 8x longer per decode step on AVX2 without VNNI). ORT's own Q/DQ fusion makes the
    same shift on x86; a graph written with the fused op directly has to make it itself.
    """
    q = m.input_quantizer
    if bool(q.observing.item()):
        raise ExportError(
            "a QuantLinear still observes activation ranges (calibration never froze it)",
            hint="run compress.qat.calibrate / freeze_observers before export",
        )
    shift = -q.qmin  # 128 for int8 levels, 0 for uint8
    return float(np.float32(q.scale.item())), int(round(q.zero_point.item())) + shift, np.uint8


def _int8_weight(m) -> tuple[np.ndarray, np.ndarray]:
    """The int8 weight ``[in, out]`` that torch's per-channel fake quant rounds the weight to, and its scales ``[out]``."""
    import torch

    with torch.no_grad():
        scale = m.weight_scale().to(torch.float32)
        fq = m.quantized_weight().to(torch.float32)
        q = torch.round(fq / scale[:, None]).clamp(-128, 127)
    if not torch.equal(q * scale[:, None], fq):
        raise ExportError(
            "a QuantLinear's fake-quantized weight is not an integer multiple of its scale",
            hint="freeze the weight scales (compress.qat.freeze_for_export) before export",
        )
    return q.to(torch.int8).numpy().T.copy(), _float(scale)


class _Builder:
    """Writes the graph of one model in one precision (see the module docstring)."""

    def __init__(self, model: nn.Module, precision: str, int8_kernel: str = "static") -> None:
        from dsk_compress.compress.qat import BlockQuantLinear, QuantLinear

        self.model, self.precision, self.kernel = model, precision, int8_kernel
        self.quant_type, self.nbits_type = QuantLinear, BlockQuantLinear
        self.g = _Graph()
        self.quantized: dict[tuple, str] = {}  # (input, scale, zp, dtype) -> QuantizeLinear output, one per distinct quantizer

    def _is_quant(self, m) -> bool:
        return isinstance(m, self.quant_type)

    def project(self, x: str, mods: list, name: str, fuse: bool = True) -> list[str]:
        """``x @ W.T (+ b)`` for each Linear in ``mods``: one output of the concatenated width when they fuse, else one each."""
        nbits = [isinstance(m, self.nbits_type) for m in mods]
        if any(nbits):
            same = len({(m.weight_bits, m.block_size) for m in mods}) == 1
            if len(mods) > 1 and not (all(nbits) and fuse and same):
                return [self.project(x, [m], f"{name}{k}", fuse)[0] for k, m in enumerate(mods)]
            if all(nbits):
                return [self._nbits_matmul(x, mods, name)]
        quant = [self._is_quant(m) for m in mods]
        if any(quant) and not all(quant):
            return [self.project(x, [m], f"{name}{k}", fuse)[0] for k, m in enumerate(mods)]
        if all(quant) and self.precision == "int8" and self.kernel != "static":
            if len(mods) > 1 and not fuse:
                return [self.project(x, [m], f"{name}{k}", fuse)[0] for k, m in enumerate(mods)]
            return [self._int8_dynamic(x, mods, name)]
        if all(quant) and self.precision == "int8":
            qs = [_act_quantizer(m) for m in mods]
            if len(mods) > 1 and (not fuse or len(set(qs)) > 1):
                return [self.project(x, [m], f"{name}{k}", fuse)[0] for k, m in enumerate(mods)]
            return [self._int8_matmul(x, mods, qs[0], name)]
        if len(mods) > 1 and not fuse:
            return [self.project(x, [m], f"{name}{k}", fuse)[0] for k, m in enumerate(mods)]
        w = np.concatenate([_float(m.weight).T for m in mods], axis=1)
        (y,) = self.g.node("MatMul", [x, self.g.init(f"{name}.weight", w)], f"{name}/MatMul")
        bias = self._bias(mods)
        if bias is not None:
            (y,) = self.g.node("Add", [y, self.g.init(f"{name}.bias", bias)], f"{name}/Add")
        return [y]

    @staticmethod
    def _bias(mods: list) -> np.ndarray | None:
        if all(m.bias is None for m in mods):
            return None
        return np.concatenate([_float(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32) for m in mods])

    def _int8_matmul(self, x: str, mods: list, quantizer: tuple[float, int, np.dtype], name: str) -> str:
        scale, zp, dtype = quantizer
        key = (x, scale, zp, np.dtype(dtype).name)
        g = self.g
        s = g.init(f"{name}.act_scale", np.array(scale, np.float32))
        z = g.init(f"{name}.act_zero_point", np.array(zp, dtype))
        if key not in self.quantized:
            (self.quantized[key],) = g.node("QuantizeLinear", [x, s, z], f"{name}/QuantizeLinear")
        ws = [_int8_weight(m) for m in mods]
        w = g.init(f"{name}.weight_int8", np.concatenate([q for q, _ in ws], axis=1))
        w_scale = g.init(f"{name}.weight_scale", np.concatenate([sc for _, sc in ws]))
        inputs = [self.quantized[key], w, s, w_scale, z, ""]
        bias = self._bias(mods)
        if bias is not None:
            inputs.append(g.init(f"{name}.bias", bias))
        (y,) = g.node("MatMulIntegerToFloat", inputs, f"{name}/MatMulIntegerToFloat", domain="com.microsoft")
        return y

    def _nbits_matmul(self, x: str, mods: list, name: str) -> str:
        """An int4 QAT model's BlockQuantLinears (one input) as one MatMulNBits with their own integers and scales."""
        from dsk_compress.export.qat_graphs import nbits_arrays

        g = self.g
        a = nbits_arrays(mods)
        inputs = [x, g.init(f"{name}.weight_q{a['attrs']['bits']}", a["B"]), g.init(f"{name}.weight_scale", a["scales"])]
        if a["bias"] is not None:
            inputs += ["", "", g.init(f"{name}.bias", a["bias"])]
        (y,) = g.node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain="com.microsoft", **a["attrs"])
        return y

    def embed(self, module, ids: str) -> str:
        """The token embedding: a Gather of the float table, or of a QAT model's int8 table (int4 graphs: one GatherBlockQuantized;
        int8 graphs: Gather of int8 rows and of their scales, for any onnxruntime)."""
        from dsk_compress.compress.qat import QuantEmbedding
        from dsk_compress.export.qat_graphs import embedding_nodes

        g = self.g
        if isinstance(module, QuantEmbedding):
            form = "block" if self.precision == "int4" else "rows"
            return embedding_nodes(g.init, lambda op, i, n, o, **a: g.node(op, i, n, **a)[0], module, ids, "embed_tokens", form=form)
        (x,) = g.node("Gather", [g.init("embed_tokens.weight", _float(module.weight)), ids], "embed_tokens/Gather")
        return x

    def _int8_dynamic(self, x: str, mods: list, name: str) -> str:
        """QAT's int8 weights with activations quantized at run time: DynamicQuantizeMatMul (per tensor, uint8) or
        MatMulNBits with 8-bit weights (per block of ``NBITS_BLOCK`` inputs, int8 compute: accuracy_level 4)."""
        g = self.g
        ws = [_int8_weight(m) for m in mods]
        q = np.concatenate([w for w, _ in ws], axis=1)  # [K, N]
        scale = np.concatenate([sc for _, sc in ws])
        bias = self._bias(mods)
        if self.kernel == "dynamic":
            inputs = [x, g.init(f"{name}.weight_int8", q), g.init(f"{name}.weight_scale", scale), ""]
            if bias is not None:
                inputs.append(g.init(f"{name}.bias", bias))
            (y,) = g.node("DynamicQuantizeMatMul", inputs, f"{name}/DynamicQuantizeMatMul", domain="com.microsoft")
            return y
        k, n = q.shape
        blocks = -(-k // NBITS_BLOCK)
        packed = np.full((n, blocks * NBITS_BLOCK), 128, np.uint8)  # stored unsigned, zero point 128 (the default for 8 bits)
        packed[:, :k] = (q.T.astype(np.int16) + 128).astype(np.uint8)
        inputs = [
            x,
            g.init(f"{name}.weight_u8", packed.reshape(n, blocks, NBITS_BLOCK)),
            g.init(f"{name}.weight_scale", np.repeat(scale, blocks).astype(np.float32)),
            "",
            "",
        ]
        if bias is not None:
            inputs.append(g.init(f"{name}.bias", bias))
        (y,) = g.node(
            "MatMulNBits", inputs, f"{name}/MatMulNBits", domain="com.microsoft", K=k, N=n, bits=8, block_size=NBITS_BLOCK, accuracy_level=4
        )
        return y


def _spec(model: nn.Module) -> dict:
    """The architecture facts the builder needs, read from a Llama-family model; refuses what it cannot express."""
    cfg = model.config
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or not hasattr(model, "lm_head"):
        raise ExportError(
            f"{type(model).__name__} is not a Llama-family causal LM (model.model.layers, lm_head)",
            hint="fused export supports Llama, Mistral, Qwen2 and Qwen3 dense decoders",
        )
    for i, layer in enumerate(layers):
        mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise ExportError(
                f"layer {i} of {type(model).__name__} has no dense gated MLP (an MoE block?)",
                hint="fused export supports dense students; use the KV-cache export for MoE",
            )
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ExportError(
                f"layer {i} of {type(model).__name__} has no q/k/v/o projections", hint="fused export supports Llama-family attention"
            )
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ExportError(f"fused export supports SiLU-gated MLPs, not hidden_act={act!r}")
    rope = getattr(base, "rotary_emb", None)
    rope_type = getattr(rope, "rope_type", "default")
    if rope is None or rope_type == "dynamic":
        raise ExportError(f"fused export needs static rotary embeddings (rope_type {rope_type!r})")
    rope_params = getattr(cfg, "rope_parameters", None) or {}
    partial = rope_params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) if isinstance(rope_params, dict) else 1.0
    if partial not in (None, 1, 1.0):  # e.g. GLM4-MoE students: rotary on half of each head
        raise ExportError(
            f"fused export needs rotary on the whole head (partial_rotary_factor {partial})",
            hint="the full-sequence and KV-cache graphs stand",
        )
    scaled = [
        k
        for k in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")
        if getattr(cfg, k, None) not in (None, 1, 1.0)
    ]
    if scaled:  # Granite: scalings the fused graph does not apply
        raise ExportError(
            f"fused export does not apply {', '.join(scaled)} ({cfg.model_type})", hint="the full-sequence and KV-cache graphs stand"
        )
    if any(getattr(layer.self_attn, "sinks", None) is not None for layer in layers):
        raise ExportError("fused export does not support attention sinks")
    from dsk_compress.export.kv_cache import _sliding_window

    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if head_dim % 16:  # ONNX Runtime's GroupQueryAttention kernel refuses it when the session runs
        raise ExportError(
            f"fused export needs a head_dim that is a multiple of 16 (ONNX Runtime's GroupQueryAttention), not {head_dim}",
            hint="the full-sequence and KV-cache graphs stand",
        )
    scaling = getattr(layers[0].self_attn, "scaling", head_dim**-0.5)
    return {
        "layers": len(layers),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "eps": float(cfg.rms_norm_eps),
        "vocab": int(cfg.vocab_size),
        "max_positions": int(cfg.max_position_embeddings),
        "window": _sliding_window(cfg),
        "scaling": float(scaling),
        "qk_norm": hasattr(layers[0].self_attn, "q_norm"),
    }


def _rope_caches(model: nn.Module, max_positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches ``[max_positions, rotary_dim / 2]`` from the model's own rotary module (its scaling included)."""
    import torch

    rope = model.model.rotary_emb
    dev = next(model.parameters()).device
    pos = torch.arange(max_positions, device=dev)[None]
    with torch.no_grad():
        cos, sin = rope(torch.zeros(1, 1, head_dim, device=dev, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2
    return _float(cos[0, :, :half]), _float(sin[0, :, :half])


def _norm_weight(module) -> np.ndarray:
    return _float(module.weight)


def build_fused_graph(model: nn.Module, precision: str = "fp32", int8_kernel: str = "static"):
    """The fused decoder graph of ``model`` as an ``onnx.ModelProto`` (``int4`` of a float model is built as fp32 and quantized
    by :func:`export_fused`; an int4 QAT model's MatMulNBits are written here)."""
    from onnx import TensorProto, helper

    spec = _spec(model)
    b = _Builder(model, precision if precision in ("int8", "int4") else "fp32", int8_kernel)
    g = b.g
    base = model.model
    eps = spec["eps"]
    kv, hd = spec["kv_heads"], spec["head_dim"]
    cos, sin = _rope_caches(model, spec["max_positions"], hd)
    cos_name, sin_name = g.init("cos_cache", cos), g.init("sin_cache", sin)
    x = b.embed(base.embed_tokens, INPUT_IDS)
    residual, pending = x, None  # pending: the last block output not yet added to the residual
    gqa_attrs = {"num_heads": spec["heads"], "kv_num_heads": kv, "do_rotary": 1, "rotary_interleaved": 0, "scale": spec["scaling"]}
    if spec["window"] is not None:
        gqa_attrs["local_window_size"] = spec["window"]  # both keep the last `window` keys (HF: k > q - window)

    def head_norm(x: str, module, name: str) -> str:
        (y,) = g.node("Reshape", [x, g.init(f"{name}.heads_shape", np.array([0, 0, -1, hd], np.int64))], f"{name}/Reshape")
        (y,) = g.node(
            "SimplifiedLayerNormalization",
            [y, g.init(f"{name}.weight", _norm_weight(module))],
            f"{name}/SimplifiedLayerNormalization",
            epsilon=float(getattr(module, "variance_epsilon", eps)),
            axis=-1,
            stash_type=1,
        )
        (y,) = g.node("Reshape", [y, g.init(f"{name}.flat_shape", np.array([0, 0, -1], np.int64))], f"{name}/Reshape_flat")
        return y

    def norm(weight: np.ndarray, name: str) -> str:
        nonlocal residual, pending
        w = g.init(f"{name}.weight", weight)
        if pending is None:
            (h,) = g.node(
                "SimplifiedLayerNormalization", [residual, w], f"{name}/SimplifiedLayerNormalization", epsilon=eps, axis=-1, stash_type=1
            )
            return h
        h, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [pending, residual, w],
            f"{name}/SkipSimplifiedLayerNormalization",
            outputs=[f"{name}/output", "", "", f"{name}/residual"],
            domain="com.microsoft",
            epsilon=eps,
        )
        pending = None
        return h

    for i, layer in enumerate(base.layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        h = norm(_norm_weight(layer.input_layernorm), f"{p}.input_layernorm")
        # Qwen3's per-head q/k RMSNorm comes before the rotary embedding; GroupQueryAttention's own q/k-norm inputs
        # run on CUDA / WebGPU only, so the projections stay apart and each norm is a SimplifiedLayerNormalization
        qkv = b.project(h, [attn.q_proj, attn.k_proj, attn.v_proj], f"{p}.attn.qkv_proj", fuse=not spec["qk_norm"])
        if spec["qk_norm"]:
            qkv = [head_norm(qkv[0], attn.q_norm, f"{p}.attn.q_norm"), head_norm(qkv[1], attn.k_norm, f"{p}.attn.k_norm"), qkv[2]]
        q_in = qkv if len(qkv) == 3 else [qkv[0], "", ""]
        pk, pv = past_names(i)
        inputs = [*q_in, pk, pv, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, cos_name, sin_name]
        (a, _, _) = g.node(
            "GroupQueryAttention",
            inputs,
            f"{p}.attn/GroupQueryAttention",
            outputs=[f"{p}.attn/output", *present_names(i)],
            domain="com.microsoft",
            **gqa_attrs,
        )
        (pending,) = b.project(a, [attn.o_proj], f"{p}.attn.o_proj")
        h = norm(_norm_weight(layer.post_attention_layernorm), f"{p}.post_attention_layernorm")
        gu = b.project(h, [mlp.gate_proj, mlp.up_proj], f"{p}.mlp.gate_up_proj")
        if len(gu) == 1:
            inter = mlp.gate_proj.out_features
            gu = g.node(
                "Split", [gu[0], g.init(f"{p}.mlp.split", np.array([inter, inter], np.int64))], f"{p}.mlp/Split", outputs=2, axis=-1
            )
        (act,) = g.node("QuickGelu", [gu[0]], f"{p}.mlp/QuickGelu", domain="com.microsoft", alpha=1.0)
        (prod,) = g.node("Mul", [act, gu[1]], f"{p}.mlp/Mul")
        (pending,) = b.project(prod, [mlp.down_proj], f"{p}.mlp.down_proj")
    h = norm(_norm_weight(base.norm), "norm")
    (logits,) = b.project(h, [model.lm_head], "lm_head")
    # name the graph output
    last = g.nodes[-1]
    last.output[0] = LOGITS

    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info(LOGITS, f, ["batch", "sequence", spec["vocab"]])]
    for i in range(spec["layers"]):
        for n in past_names(i):
            inputs.append(helper.make_tensor_value_info(n, f, ["batch", kv, "max_sequence", hd]))
        for n in present_names(i):
            outputs.append(helper.make_tensor_value_info(n, f, ["batch", kv, "max_sequence", hd]))
    graph = helper.make_graph(g.nodes, "fused_decoder", inputs, outputs, g.inits)
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], producer_name="dsk-compress"
    )
    m.ir_version = 10
    layout = FusedLayout(spec["layers"], kv, hd, spec["vocab"], spec["max_positions"], precision, spec["window"])
    helper.set_model_props(m, {METADATA_KEY: json.dumps(layout.__dict__)})
    return m


def quantize_int4(src: str | Path, dst: str | Path, block_size: int = 32, accuracy_level: int | None = 4) -> Path:
    """Any fp32 ONNX graph (e.g. a full-sequence export) with every constant-weight MatMul as int4 MatMulNBits, at ``dst``."""
    import onnx

    return graph_files.save(_quantize_int4(onnx.load(str(src)), block_size, accuracy_level), dst)


def _nbits_quantizer_module():
    """``onnxruntime.quantization.matmul_nbits_quantizer``. Importing it calls ``logging.basicConfig(level=INFO)`` on the
    root logger, after which every library's INFO lines (ONNX Runtime's static quantizer logs each tensor) reach the
    user's terminal; the root logger's level and handlers are put back as they were."""
    import logging
    import sys

    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    if name in sys.modules:
        return sys.modules[name]
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import onnxruntime.quantization.matmul_nbits_quantizer as module

    root.setLevel(level)
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    return module


def _quantize_int4(m, block_size: int, accuracy_level: int | None):
    """Every MatMul with a constant weight as a blockwise symmetric int4 MatMulNBits (ONNX Runtime's quantizer)."""
    import logging

    nbits = _nbits_quantizer_module()
    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = nbits.DefaultWeightOnlyQuantConfig, nbits.MatMulNBitsQuantizer
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=4)
    q = MatMulNBitsQuantizer(m, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, algo_config=cfg)
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        q.process()
    finally:
        log.setLevel(level)
    return q.model.model


def export_fused(
    model: nn.Module,
    path: str | Path,
    precision: str = "fp32",
    *,
    block_size: int = 32,
    accuracy_level: int | None = 4,
    int8_kernel: str = "static",
) -> Path:
    """Write the fused decoder graph of ``model`` to ``path`` (atomically) and return the path.

    Args:
        model: a Hugging Face Llama-family causal LM; for ``int8`` a QAT model with frozen weight scales; for ``int4`` an
            int4 QAT model (exported with its own integers and scales) or a float model (quantized here, post-training).
        precision: ``fp32``, ``int8`` (QAT, bit-compatible with its fake quant) or ``int4`` (MatMulNBits).
        block_size: int4 post-training only: quantization block along the input features (a power of two >= 16).
        accuracy_level: int4 post-training only: MatMulNBits' compute type (4: int8 activations quantized per block at
            run time, ONNX Runtime's CPU default; 0/1: fp32). An int4 QAT model always gets 4, the scheme it trained with.
        int8_kernel: int8 only: one of :data:`INT8_KERNELS` (``static``, the default, is the bit-compatible one).
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown fused precision {precision!r}", hint=f"valid: {', '.join(PRECISIONS)}")
    if int8_kernel not in INT8_KERNELS:
        raise ExportError(f"unknown int8 kernel {int8_kernel!r}", hint=f"valid: {', '.join(INT8_KERNELS)}")
    from dsk_compress.compress.qat import qat_scheme

    scheme = qat_scheme(model)
    if precision == "int8" and scheme != "int8":
        raise ExportError(
            "int8 fused export needs a QAT model trained in int8 (QuantLinear layers)", hint="run the qat stage, or export fp32 / int4"
        )
    if scheme is not None and precision != scheme:
        raise ExportError(f"{precision} fused export got an {scheme} QAT model", hint=f"export it as {scheme}")
    model = model.eval()
    m = build_fused_graph(model, precision, int8_kernel)
    if precision == "int4" and scheme is None:  # post-training: ONNX Runtime's RTN quantizer on the fp32 graph
        m = _quantize_int4(m, block_size, accuracy_level)
    # no onnx.checker: ONNX Runtime's fused normalizations sit in the default domain, unknown to it (the parity check loads it)
    return graph_files.save(m, path, check=False)


def check_fused_parity(model: nn.Module, path: str | Path, prompt: np.ndarray, new_tokens: int = 8, threads: int | None = None) -> dict:
    """Greedy-decode ``new_tokens`` after ``prompt`` in torch (the model's own cache) and with the fused graph; compare.

    Same numbers as :func:`dsk_compress.export.kv_cache.check_kv_parity` (:func:`~dsk_compress.export.kv_cache.greedy_parity`).
    """
    from dsk_compress.export.kv_cache import greedy_parity
    from dsk_compress.runtimes.decoder import FusedDecoderSession

    return greedy_parity(model, FusedDecoderSession(path, threads=threads), prompt, new_tokens)


INT4_MIN_SQNR_DB = 15.0
"""Floor of the int4 graph's step-logit SQNR against the float model (seen: 18.6 dB on a random tiny Llama, 29 dB on the
default run's pruned student)."""


def export_fused_checked(
    model: nn.Module, path: str | Path, precision: str, example: np.ndarray, *, parity_atol: float, min_sqnr_db: float, new_tokens: int = 8
) -> dict:
    """:func:`export_fused`, then :func:`check_fused_parity` on the first (up to) 16 tokens of ``example[0]``.

    Returns ``{"path", "precision", "prompt_tokens", "fused_ops", <check_fused_parity's numbers>}``, or ``{"error": message}``
    when the model is not one the fused builder supports (an MoE block, another attention): the other graphs stand.
    Raises ExportError when the graph disagrees with torch: fp32 step logits beyond ``parity_atol``, int8 and int4 QAT
    step-logit SQNR against the fake-quant model below ``min_sqnr_db`` (or int4 QAT greedy tokens that differ), post-training
    int4 SQNR against the float model below :data:`INT4_MIN_SQNR_DB`.
    """
    from dsk_compress.compress.qat import qat_scheme
    from dsk_compress.export.onnx import fused_ops, op_histogram

    try:
        _spec(model)
    except ExportError as e:
        return {"error": e.message}
    path = export_fused(model, path, precision)
    prompt = np.asarray(example)[0, : min(16, np.asarray(example).shape[1])]
    info = {
        "path": path,
        "precision": precision,
        "prompt_tokens": int(prompt.size),
        "fused_ops": fused_ops(op_histogram(path)),
        **check_fused_parity(model, path, prompt, new_tokens=new_tokens),
    }
    qat_int4 = precision == "int4" and qat_scheme(model) == "int4"
    floor = {"int8": min_sqnr_db, "int4": min_sqnr_db if qat_int4 else INT4_MIN_SQNR_DB}.get(precision)
    if qat_int4 and not info["tokens_match"]:
        raise ExportError(
            f"{path.name}: fused int4 greedy tokens differ from the fake-quant model's after {info['matched_tokens']} "
            f"(step-logit SQNR {info['step_logits_sqnr_db']} dB)",
            hint="set stages.N.kv_cache: false and report a bug",
        )
    if floor is None and info["step_logits_max_abs_diff"] > parity_atol:
        raise ExportError(
            f"{path.name}: fused decode-step logits differ from torch by {info['step_logits_max_abs_diff']:.2e} "
            f"(> parity_atol {parity_atol})",
            hint="set stages.N.kv_cache: false and report a bug",
        )
    if floor is not None and info["step_logits_sqnr_db"] < floor:
        raise ExportError(
            f"{path.name}: fused {precision} step-logit SQNR {info['step_logits_sqnr_db']} dB vs torch is below {floor} dB",
            hint="set stages.N.kv_cache: false and report a bug",
        )
    return info
