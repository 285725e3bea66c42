"""Structured pruning of attention heads and FFN channels with torch-pruning's dependency graph.

The model's config is rewritten after each step so the pruned model saves, reloads and exports
like any other model of its family.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch
from torch import nn

from dsk_compress.errors import DskError, RecipeError
from dsk_compress.models.source import count_params


class PruneTimeout(DskError):
    pass


@contextmanager
def _time_limit(seconds: float):
    """Abort a pruning step that hangs (torch-pruning hangs on some GQA graphs)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise PruneTimeout(f"pruning did not finish in {seconds:.0f} s", hint="raise stages.N.timeout_s or prune fewer structures")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def structure(model: nn.Module) -> dict:
    """Per-layer head and FFN-channel counts of a Llama-family decoder."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = attn.head_dim
        layers.append({"heads": attn.q_proj.out_features // head_dim, "kv_heads": attn.k_proj.out_features // head_dim,
                       "ffn": mlp.gate_proj.out_features})
    return {"layers": layers, "params": count_params(model)}


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean")
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise RecipeError(f"unknown importance {kind!r}", hint="valid: l1, l2, taylor")


def check_prunable(cfg, ffn_ratio: float, head_ratio: float, round_to: int) -> None:
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads)
    if head_ratio > 0 and kv != heads:
        raise RecipeError("head pruning of grouped-query attention is not supported yet", hint="set head_ratio: 0")
    if head_ratio > 0 and round(heads * (1 - head_ratio)) < 1:
        raise RecipeError(f"head_ratio {head_ratio} leaves no attention heads (the model has {heads})", hint="lower head_ratio")
    if ffn_ratio > 0 and cfg.intermediate_size * (1 - ffn_ratio) < round_to:
        raise RecipeError(f"ffn_ratio {ffn_ratio} leaves fewer than round_to={round_to} FFN channels", hint="lower ffn_ratio or round_to")


def prune_step(model: nn.Module, example_inputs: torch.Tensor, ffn_ratio: float, head_ratio: float,
               importance: str = "l2", round_to: int = 8, timeout_s: float = 300,
               loss_for_taylor=None) -> dict:
    """Remove ``ffn_ratio`` of each layer's FFN channels and ``head_ratio`` of its heads (uniform per layer).

    Ratios are relative to the model's current size. Returns the structure after pruning.
    """
    import torch_pruning as tp

    cfg = model.config
    check_prunable(cfg, ffn_ratio, head_ratio, round_to)
    num_heads, ignored = {}, [model.lm_head, model.model.embed_tokens]
    for layer in model.model.layers:
        attn = layer.self_attn
        if head_ratio > 0:
            num_heads[attn.q_proj] = cfg.num_attention_heads
            num_heads[attn.k_proj] = cfg.num_key_value_heads
            num_heads[attn.v_proj] = cfg.num_key_value_heads
        else:
            ignored += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    # RMSNorm weights are plain parameters torch-pruning cannot see through; they live on the hidden dim
    unwrapped = [(m.weight, 0) for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    model.eval()
    with _time_limit(timeout_s):
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example_inputs,
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
            importance=_importance(importance),
            global_pruning=False,
            pruning_ratio=ffn_ratio,
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=head_ratio > 0,
            prune_head_dims=False,
            head_pruning_ratio=head_ratio,
            round_to=round_to,
            unwrapped_parameters=unwrapped,
        )
        if importance == "taylor":
            model.zero_grad()
            loss_for_taylor(model).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)
    _rewrite_config(model)
    return structure(model)


def _rewrite_config(model: nn.Module) -> None:
    cfg = model.config
    layers = model.model.layers
    attn0 = layers[0].self_attn
    heads = attn0.q_proj.out_features // attn0.head_dim
    kv = attn0.k_proj.out_features // attn0.head_dim
    ffn = layers[0].mlp.gate_proj.out_features
    for layer in layers:
        a = layer.self_attn
        if a.q_proj.out_features // a.head_dim != heads or layer.mlp.gate_proj.out_features != ffn:
            raise DskError("pruning left layers of different widths", hint="use uniform (per-layer) pruning")
        a.num_key_value_groups = heads // kv
        if hasattr(a, "num_heads"):
            a.num_heads = heads
        layer.mlp.intermediate_size = ffn
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = kv
    cfg.intermediate_size = ffn
    cfg.head_dim = attn0.head_dim
