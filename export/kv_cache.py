"""ONNX export of a decoder with a KV cache: one graph for both prefill and token-by-token decode.

Graph interface (the layout Hugging Face Optimum's ``text-generation-with-past`` uses)::

    inputs   input_ids               int64 [batch, sequence]
             attention_mask          int64 [batch, past_sequence + sequence]   (1 = real token)
             past_key_values.{i}.key   float [batch, kv_heads, past_sequence, key_dim]     per layer i
             past_key_values.{i}.value float [batch, kv_heads, past_sequence, value_dim]
    outputs  logits                  float [batch, sequence, vocab]
             present.{i}.key / present.{i}.value   [batch, kv_heads, past_sequence + sequence, dim]

Prefill feeds the prompt with empty pasts (``past_sequence = 0``); each decode step feeds one token
and the previous step's ``present`` tensors as ``past_key_values``. The graph is traced with a
non-empty past (a zero-length past at trace time would let the tracer take the "no cache yet"
branches of transformers' cache code) and runs with ``past_sequence = 0`` in ONNX Runtime, which
the tests check against the full-sequence graph.

Position ids are ``cumsum(attention_mask) - 1`` (what ``generate`` computes, so left padding works)
and the wrapper passes an explicit additive 4-D mask (causal, padding, and the sliding window of
Mistral-style models), because transformers' own mask code does not trace with ``dynamo=False``.
The cache inside the wrapper is a ``transformers.DynamicCache`` rebuilt from the flat past tensors,
so every attention implementation transformers has for the family (eager here) appends to it as in
``generate``. The INT8 variant reuses the Q/DQ pipeline of :func:`dsk_compress.export.onnx.export_int8_qdq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files
from dsk_compress.models.common import cache_kwargs, output_cache
from dsk_compress.runtimes.decoder import past_names, present_names  # one naming for every decoder graph

INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"


@dataclass(frozen=True)
class KVLayout:
    """Shapes of one model's cache: ``kv_heads`` and the key / value widths of each layer."""

    layers: int
    kv_heads: tuple[int, ...]
    key_dims: tuple[int, ...]
    value_dims: tuple[int, ...]

    def empty_past(self, batch: int = 1, dtype=np.float32) -> dict[str, np.ndarray]:
        """Zero-length past tensors for a prefill step."""
        out = {}
        for i in range(self.layers):
            k, v = past_names(i)
            out[k] = np.zeros((batch, self.kv_heads[i], 0, self.key_dims[i]), dtype)
            out[v] = np.zeros((batch, self.kv_heads[i], 0, self.value_dims[i]), dtype)
        return out


def is_decoder_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM (the only kind with a KV-cache export)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and type(model).__name__.endswith("ForCausalLM")


def kv_layout(model: nn.Module) -> KVLayout:
    """The cache layout of ``model``, read from the cache one real forward step produces.

    Reading it from a forward pass (not the config) covers grouped-query attention, a ``head_dim``
    set apart from the width, and MLA attention whose keys and values differ in width.
    """
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dev), **cache_kwargs(model, DynamicCache()), use_cache=True)
    except Exception as e:  # a model without input_ids / past_key_values: not a decoder this exporter handles
        raise ExportError(
            f"{type(model).__name__} cannot run with a DynamicCache: {str(e).splitlines()[0][:200]}",
            hint="KV-cache export supports transformers causal LMs",
        ) from e
    cache = output_cache(out)
    if cache is None or not hasattr(cache, "layers"):
        raise ExportError(
            f"{type(model).__name__} returned no DynamicCache with use_cache=True",
            hint="KV-cache export supports transformers decoders that use DynamicCache",
        )
    ks = [layer.keys for layer in cache.layers]
    vs = [layer.values for layer in cache.layers]
    return KVLayout(len(ks), tuple(k.shape[1] for k in ks), tuple(k.shape[-1] for k in ks), tuple(v.shape[-1] for v in vs))


def layout_from_onnx(path_or_session) -> KVLayout:
    """The cache layout of an exported KV graph, from its input shapes (static dims are written there)."""
    if isinstance(path_or_session, (str, Path)):
        import onnx

        g = onnx.load(str(path_or_session), load_external_data=False).graph
        shapes = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim] for i in g.input}
    else:
        shapes = {i.name: [d if isinstance(d, int) else None for d in i.shape] for i in path_or_session.get_inputs()}
    n = 0
    while past_names(n)[0] in shapes:
        n += 1
    if n == 0:
        raise ExportError("the ONNX model has no past_key_values.0.key input: it is not a KV-cache graph")
    k = [shapes[past_names(i)[0]] for i in range(n)]
    v = [shapes[past_names(i)[1]] for i in range(n)]
    return KVLayout(n, tuple(s[1] for s in k), tuple(s[3] for s in k), tuple(s[3] for s in v))


def _sliding_window(config) -> int | None:
    """The attention window every layer applies, None for full attention; mixed layers are refused."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return None
    if types is None or set(types) == {"sliding_attention"}:
        return int(window)
    if set(types) == {"full_attention"}:
        return None
    raise ExportError(
        f"KV-cache export of {config.model_type} with mixed sliding and full attention layers is not supported",
        hint="set stages.N.kv_cache: false",
    )


class KVCacheLMWrapper(nn.Module):
    """``(input_ids, attention_mask, *past) -> (logits, *present)`` around a Hugging Face causal LM.

    ``past`` is flat: key and value of layer 0, then of layer 1, ... The wrapper rebuilds a
    ``DynamicCache`` from them, runs the model with an explicit additive 4-D mask and position ids
    derived from ``attention_mask``, and returns the grown cache flat again.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.window = _sliding_window(model.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        s = input_ids.shape[1]
        total = attention_mask.shape[1]  # past + new tokens
        dtype = next(self.model.parameters()).dtype
        keep = attention_mask.to(torch.bool)
        q_pos = torch.arange(s, device=input_ids.device) + (total - s)  # absolute slot of each new token
        k_pos = torch.arange(total, device=input_ids.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < self.window)
        allowed = allowed[None, None] & keep[:, None, None, :]  # [B, 1, S, total]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(~keep, 1)[:, total - s :]
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            **cache_kwargs(self.model, cache),
            cache_position=q_pos,
            use_cache=True,
        )
        present = []
        for layer in output_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_causal_lm_with_past(model: nn.Module, path: str | Path, opset: int = 17, trace_past: int = 3, trace_new: int = 2) -> Path:
    """Export ``model`` as a decoder-with-past ONNX graph (see the module docstring); atomically written.

    The trace uses random token ids with a past of ``trace_past`` slots and ``trace_new`` new
    tokens; batch, sequence and past length are dynamic axes.
    """
    if not is_decoder_lm(model):
        raise ExportError(
            f"{type(model).__name__} is not a transformers causal LM: no KV-cache export", hint="KV-cache export is for decoder students"
        )
    model = model.eval()
    layout = kv_layout(model)
    wrapper = KVCacheLMWrapper(model).eval()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b = 1
    ids = torch.randint(0, int(model.config.vocab_size), (b, trace_new), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones(b, trace_past + trace_new, dtype=torch.long, device=dev)
    past, in_names, out_names = [], [INPUT_IDS, ATTENTION_MASK], [LOGITS]
    axes = {INPUT_IDS: {0: "batch", 1: "sequence"}, ATTENTION_MASK: {0: "batch", 1: "total_sequence"}, LOGITS: {0: "batch", 1: "sequence"}}
    for i in range(layout.layers):
        g = torch.Generator().manual_seed(i + 1)
        past.append(torch.randn(b, layout.kv_heads[i], trace_past, layout.key_dims[i], generator=g).to(dev, dtype))
        past.append(torch.randn(b, layout.kv_heads[i], trace_past, layout.value_dims[i], generator=g).to(dev, dtype))
        for name in past_names(i):
            in_names.append(name)
            axes[name] = {0: "batch", 2: "past_sequence"}
        for name in present_names(i):
            out_names.append(name)
            axes[name] = {0: "batch", 2: "total_sequence"}
    from dsk_compress.export.onnx import torch_export

    return torch_export(
        wrapper,
        (ids, mask, *past),
        path,
        what="KV-cache ONNX export",
        input_names=in_names,
        output_names=out_names,
        dynamic_axes=axes,
        opset_version=opset,
    )


def export_int8_qdq_with_past(model: nn.Module, qdq_path: str | Path, opset: int = 17) -> dict:
    """The KV-cache counterpart of :func:`~dsk_compress.export.onnx.export_int8_qdq` for a frozen QAT model.

    Same pipeline: export, simplify, fold weight quantizers to int8 initializers stored ``[in, out]``,
    one activation Q/DQ per Linear. The cache holds the dequantized (float) k/v projections, so a
    cached step quantizes exactly the activations the full-sequence graph does.
    """
    from dsk_compress.export.onnx import fold_weight_quantizers, fold_weight_transposes, simplify, unshare_activation_qdq
    from dsk_compress.export.qat_graphs import dequantized

    qdq_path = Path(qdq_path)
    with dequantized(model):  # an int8 embedding is traced as its dequantized table
        raw = export_causal_lm_with_past(model, qdq_path.with_name(qdq_path.stem + ".raw.onnx"), opset)
    simplify(raw)
    info = {
        "folded_weights": fold_weight_quantizers(raw),
        "weight_transposes_folded": fold_weight_transposes(raw),
        "activation_qdq_split": unshare_activation_qdq(raw),
    }
    graph_files.move(raw, qdq_path)
    return info


def export_float_with_past(model: nn.Module, path: str | Path, opset: int = 17, optimization: str = "extended") -> Path:
    """Export, simplify and ORT-optimize a float decoder-with-past graph to ``path``."""
    from dsk_compress.export.onnx import ort_optimize, simplify

    path = Path(path)
    raw = export_causal_lm_with_past(model, path.with_name(path.name.removesuffix(".onnx") + ".raw.onnx"), opset)
    simplify(raw)
    out = ort_optimize(raw, path, optimization)
    graph_files.remove(raw)
    return out


@torch.no_grad()
def torch_greedy(model: nn.Module, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference greedy decode in torch with the model's own cache: ``(tokens [new_tokens], step logits [new_tokens, V])``.

    Step ``k``'s logits are those that chose token ``k`` (the prefill's last position for ``k = 0``).
    """
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(prompt, np.int64).reshape(1, -1), device=dev)
    cache = DynamicCache()
    out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    toks, logits = [], []
    for _ in range(new_tokens):
        last = out.logits[0, -1].float()
        nxt = int(last.argmax())
        toks.append(nxt)
        logits.append(last.cpu().numpy())
        out = model(input_ids=torch.tensor([[nxt]], device=dev), **cache_kwargs(model, output_cache(out)), use_cache=True)
    return np.asarray(toks, np.int64), np.stack(logits)


def check_kv_parity(model: nn.Module, kv_path: str | Path, prompt: np.ndarray, new_tokens: int = 8, threads: int | None = None) -> dict:
    """Greedy-decode ``new_tokens`` after ``prompt`` in torch and with the ONNX KV graph; compare (:func:`greedy_parity`)."""
    from dsk_compress.runtimes.decoder import KVCacheSession

    return greedy_parity(model, KVCacheSession(kv_path, threads=threads), prompt, new_tokens)


def greedy_parity(model: nn.Module, session, prompt: np.ndarray, new_tokens: int) -> dict:
    """Greedy-decode ``new_tokens`` after ``prompt`` in torch and with ``session`` (a decode session with ``greedy`` and
    ``step_logits``); compare.

    Returns ``{"tokens_match", "matched_tokens", "step_logits_max_abs_diff", "step_logits_sqnr_db"}``;
    the logits are compared step by step on the torch token path (ONNX Runtime is fed torch's
    tokens), so one near-tie cannot hide the error of the later steps.
    """
    from dsk_compress.compress.qat import sqnr_db

    ref_tokens, ref_logits = torch_greedy(model, prompt, new_tokens)
    got_tokens, _ = session.greedy(prompt, new_tokens)
    forced = session.step_logits(prompt, ref_tokens[:-1])
    matched = int(np.argmin(np.append(got_tokens == ref_tokens, False)))
    return {
        "tokens_match": bool((got_tokens == ref_tokens).all()),
        "matched_tokens": matched,
        "new_tokens": new_tokens,
        "step_logits_max_abs_diff": float(np.abs(forced - ref_logits).max()),
        "step_logits_sqnr_db": round(sqnr_db(ref_logits, forced), 2),
    }


def export_kv_cache(
    model: nn.Module,
    path: str | Path,
    example: np.ndarray,
    opset: int = 17,
    optimization: str = "extended",
    *,
    parity_atol: float,
    min_sqnr_db: float,
    int8: bool = False,
    new_tokens: int = 8,
) -> dict:
    """The ORT-optimized KV-cache graph of a decoder student at ``path``, checked by greedy decoding against torch.

    MoE blocks switch to their exact dense routing first (routing must not be baked into the trace). ``int8``:
    ``model`` is a frozen QAT model, exported through :func:`export_int8_qdq_with_past`. The check decodes
    ``new_tokens`` after the first (up to) 16 tokens of ``example[0]`` (:func:`check_kv_parity`).

    Returns ``{"path", "prompt_tokens", <check_kv_parity's numbers>}`` (+ ``"integer_matmuls"`` for int8), or
    ``{"error": message}`` when the exporter cannot handle the model (the full-sequence graph still stands).
    Raises ExportError when the graph disagrees with torch: float step logits beyond ``parity_atol``; int8 with
    fewer integer MatMuls than quantized Linears or a step-logit SQNR below ``min_sqnr_db``.
    """
    from dsk_compress.compress.moe import densify_moe
    from dsk_compress.compress.qat import quant_layers
    from dsk_compress.export.int8 import int8_embedding
    from dsk_compress.export.onnx import INTEGER_MATMULS, op_histogram, ort_optimize

    path = Path(path)
    densify_moe(model)
    try:
        if int8:
            qdq = path.with_name(path.name.removesuffix(".onnx") + ".qdq.onnx")
            export_int8_qdq_with_past(model, qdq, opset)
            ort_optimize(qdq, path, optimization)
            graph_files.remove(qdq)
            int8_embedding(path, model)
        else:
            export_float_with_past(model, path, opset, optimization)
    except ExportError as e:
        return {"error": e.message}
    prompt = np.asarray(example)[0, : min(16, np.asarray(example).shape[1])]
    info = {"path": path, "prompt_tokens": int(prompt.size), **check_kv_parity(model, path, prompt, new_tokens=new_tokens)}
    if int8:
        info["integer_matmuls"] = sum(v for k, v in op_histogram(path).items() if k in INTEGER_MATMULS)
        if info["integer_matmuls"] != len(quant_layers(model)) or info["step_logits_sqnr_db"] < min_sqnr_db:
            raise ExportError(
                f"{path.name}: {info['integer_matmuls']} of {len(quant_layers(model))} quantized Linears are integer ops, "
                f"step-logit SQNR {info['step_logits_sqnr_db']} dB vs torch fake-quant (min {min_sqnr_db})",
                hint="set stages.N.kv_cache: false and report a bug",
            )
    elif info["step_logits_max_abs_diff"] > parity_atol:
        raise ExportError(
            f"{path.name}: decode-step logits differ from torch by {info['step_logits_max_abs_diff']:.2e} (> parity_atol {parity_atol})",
            hint="set stages.N.kv_cache: false and report a bug",
        )
    return info
