"""MoE helpers: dense routing for export/pruning, and router statistics measured on task data.

A traced MoE with data-dependent routing bakes in which experts the example hit. The dense path
below computes every expert and weights it by the (renormalised) top-k gate, which equals the
sparse block's output exactly, and traces into a static graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All sparse MoE blocks in ``model`` (modules with a ``gate`` router and an ``experts`` list)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "gate", None), nn.Linear) and isinstance(getattr(m, "experts", None), nn.ModuleList)
    ]


def is_moe(model: nn.Module) -> bool:
    return bool(moe_blocks(model))


def _dense_forward(self, hidden_states: torch.Tensor):
    b, t, h = hidden_states.shape
    x = hidden_states.reshape(-1, h)
    router_logits = self.gate(x)
    probs = F.softmax(router_logits, dim=1, dtype=torch.float)
    top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_w).to(x.dtype)
    out = self.experts[0](x) * weights[:, 0:1]
    for e in range(1, len(self.experts)):
        out = out + self.experts[e](x) * weights[:, e : e + 1]
    return out.reshape(b, t, h), router_logits


def densify_moe(model: nn.Module) -> nn.Module:
    """Switch every Mixtral-style MoE block of ``model`` (in place) to the exact dense-routing path."""
    for _, block in moe_blocks(model):
        if getattr(block, "_dsk_dense", False):
            continue
        if not hasattr(block, "top_k"):
            from dsk_compress.errors import ModelSourceError

            raise ModelSourceError(f"unsupported MoE block {type(block).__name__}", hint="supported: Mixtral-style blocks")
        cls = type(block)
        dense_cls = type(f"Dense{cls.__name__}", (cls,), {"forward": _dense_forward, "_dsk_dense": True})
        block.__class__ = dense_cls
    return model


@torch.no_grad()
def router_frequencies(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Fraction of top-k routing slots each expert receives, per MoE block, on ``batches`` of input ids."""
    counts: dict[str, torch.Tensor] = {}
    hooks = []
    for name, block in moe_blocks(model):
        k = block.top_k

        def hook(mod, inp, out, name=name, k=k):
            logits = out.reshape(-1, out.shape[-1])
            sel = logits.topk(k, dim=-1).indices.reshape(-1)
            c = torch.bincount(sel, minlength=logits.shape[-1]).double()
            counts[name] = counts.get(name, 0) + c

        hooks.append(block.gate.register_forward_hook(hook))
    try:
        dev = next(model.parameters()).device
        for x in batches:
            model(input_ids=torch.as_tensor(x, device=dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: (c / c.sum()).float() for n, c in counts.items()}
