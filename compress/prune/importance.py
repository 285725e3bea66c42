"""Importance measures: which channels, KV groups and decoder layers matter least.

- Weights: ``ffn_channel_scores`` and ``kv_group_scores`` sum |w| (l1), w**2 (l2) or |w * grad|
  (taylor) over everything a channel or KV group owns; ``tp_importance`` is torch-pruning's group
  importance for the same names (FFN channels of per-head-attention families, CNN channels).
- Activations on calibration data: ``activation_scores`` (mean |activation| per FFN channel, mean
  output norm per attention head) and ``block_influence`` (ShortGPT's ``1 - cos(input, output)``
  per decoder layer).
"""

from __future__ import annotations

import torch
from torch import nn

from dsk_compress.errors import DskError, RecipeError
from dsk_compress.models.common import eval_mode

IMPORTANCES = ("l1", "l2", "taylor", "activation")


# ---------------------------------------------------------------------------------------------
# weights


def _group_rows(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a per-channel vector into ``groups`` consecutive equal blocks."""
    return t.reshape(groups, -1).sum(1)


def _weight_score(importance: str):
    """Elementwise importance of a weight: |w| (l1), w**2 (l2) or |w * grad| (taylor, needs gradients)."""

    def f(p: torch.Tensor) -> torch.Tensor:
        if importance == "l1":
            return p.detach().abs()
        if importance == "l2":
            return p.detach() ** 2
        if p.grad is None:
            raise DskError("taylor importance needs gradients; none were computed", hint="use importance: l2 or give a loss")
        return (p.detach() * p.grad.detach()).abs()

    return f


def ffn_channel_scores(mlp: nn.Module, importance: str) -> torch.Tensor:
    """Weight importance of each FFN channel: its gate and up rows and its down_proj column (l1, l2, taylor)."""
    f = _weight_score(importance)
    return f(mlp.gate_proj.weight).double().sum(1) + f(mlp.up_proj.weight).double().sum(1) + f(mlp.down_proj.weight).double().sum(0)


def kv_group_scores(attn: nn.Module, importance: str, act_heads: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each KV group of one attention module (the group's KV head and its query heads).

    l1 / l2: sum of |w| / w**2 over the group's q, k, v rows (and biases) and o_proj columns;
    taylor: sum of |w * grad| over the same weights (needs gradients); activation: sum of the group's
    query heads' mean output norms (``act_heads``).
    """
    d = attn.head_dim
    kv = attn.k_proj.out_features // d
    if importance == "activation":
        if act_heads is None:
            raise ValueError("activation importance needs measured head outputs")
        return _group_rows(act_heads.double(), kv)
    f = _weight_score(importance)
    score = torch.zeros(kv, dtype=torch.float64)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        score += _group_rows(f(lin.weight).double().sum(1), kv)
        if lin.bias is not None:
            score += _group_rows(f(lin.bias).double(), kv)
    score += _group_rows(f(attn.o_proj.weight).double().sum(0), kv)
    return score


def tp_importance(kind: str):
    """torch-pruning's group importance for ``l1`` / ``l2`` (mean magnitude over the group) or ``taylor``."""
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean")
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise RecipeError(f"importance {kind!r} is not a weight importance", hint="valid: l1, l2, taylor")


# ---------------------------------------------------------------------------------------------
# activations on calibration data


def _run_hooked(model: nn.Module, batches, handles) -> None:
    """Forward ``batches`` through ``model`` in eval mode, then remove the hook ``handles``."""
    try:
        with eval_mode(model):
            for x in batches:
                model(input_ids=torch.as_tensor(x), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_influence(model: nn.Module, batches) -> list[float]:
    """Per decoder layer: mean over tokens of ``1 - cos(h_in, h_out)`` (ShortGPT's block influence).

    A layer whose output equals its input scores 0 and is the first to go.
    """
    layers = list(model.model.layers)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook(i):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    _run_hooked(model, batches, handles)
    return [s / max(1, c) for s, c in zip(sums, counts)]


@torch.no_grad()
def activation_scores(model: nn.Module, batches) -> dict[str, list[torch.Tensor]]:
    """Mean |activation| of each FFN intermediate channel (the input of ``down_proj``) and mean L2 norm
    of each attention head's output (the input of ``o_proj``), per layer, over calibration tokens."""
    layers = list(model.model.layers)
    ffn = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    # the output head width: head_dim, or v_head_dim for multi-head latent attention
    head_dims = [getattr(layer.self_attn, "v_head_dim", None) or layer.self_attn.head_dim for layer in layers]
    heads = [torch.zeros(layer.self_attn.o_proj.in_features // hd, dtype=torch.float64) for layer, hd in zip(layers, head_dims)]
    tokens = [0] * len(layers)

    def ffn_hook(i):
        def fn(mod, args):
            x = args[0]
            ffn[i] += x.abs().double().reshape(-1, x.shape[-1]).sum(0)
            tokens[i] += x.numel() // x.shape[-1]

        return fn

    def head_hook(i, head_dim):
        def fn(mod, args):
            x = args[0].double()
            heads[i] += x.reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1).reshape(-1, heads[i].numel()).sum(0)

        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i, head_dims[i])))
    _run_hooked(model, batches, handles)
    return {"ffn": [f / max(1, t) for f, t in zip(ffn, tokens)], "heads": [h / max(1, t) for h, t in zip(heads, tokens)]}
