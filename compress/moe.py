"""MoE families, dense routing for export/pruning, and router statistics measured on task data.

One :class:`Family` entry per Hugging Face ``config.model_type`` says where a decoder layer keeps its
FFN, which layers are sparse, how its routed experts name their projections, how it routes, and
which shared expert it adds. Everything else (dense routing, router statistics, student init) is
written once against that table.

A traced MoE with data-dependent routing bakes in which experts the example hit. The dense path
below computes every expert and weights it by the family's own top-k gate (zero for the experts a
token does not use), which equals the sparse block's output, and traces into a static graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _all_layers(cfg, i: int) -> bool:
    return True


def _no_layer(cfg, i: int) -> bool:
    return False


def _qwen_sparse(cfg, i: int) -> bool:
    # Qwen2-MoE / Qwen3-MoE: mlp_only_layers and decoder_sparse_step make some layers dense
    return i not in cfg.mlp_only_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0


def _deepseek_sparse(cfg, i: int) -> bool:
    return i >= cfg.first_k_dense_replace  # the first first_k_dense_replace layers are dense


@dataclass(frozen=True)
class Family:
    """How one model family lays out its decoder FFNs (attribute names, routing, shared expert)."""

    student: str                                         # model_type of the dense student (same attention numerics)
    sparse: Callable = _no_layer                         # (config, layer index) -> is that layer an MoE block
    ffn: str = "mlp"                                     # decoder-layer attribute holding the FFN or MoE block
    expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # routed experts' gate / up / down
    routing: str = "softmax"                             # softmax top-k on gate logits | "router": block.gate returns (idx, w)
    shared: str | None = None                            # shared expert added to every token
    shared_gate: str | None = None                       # its sigmoid gate (Qwen2-MoE), if any
    returns_logits: bool = True                          # block returns (hidden, router_logits)
    n_experts: str = "num_experts"                       # config key: routed experts per MoE layer


FAMILIES: dict[str, Family] = {
    "mixtral": Family("llama", _all_layers, ffn="block_sparse_moe", expert=("w1", "w3", "w2"), n_experts="num_local_experts"),
    "qwen2_moe": Family("qwen2", _qwen_sparse, shared="shared_expert", shared_gate="shared_expert_gate"),
    "qwen3_moe": Family("qwen3", _qwen_sparse),
    # DeepSeek-V3's student keeps its MLA attention: a DeepseekV3 config with every layer dense
    "deepseek_v3": Family("deepseek_v3", _deepseek_sparse, routing="router", shared="shared_experts", returns_logits=False,
                          n_experts="n_routed_experts"),
    "llama": Family("llama"),
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
}
DENSE_PROJ = ("gate_proj", "up_proj", "down_proj")  # every family's dense MLP


def family(cfg) -> Family:
    """The :class:`Family` of a Hugging Face config; an unknown ``model_type`` is a ModelSourceError."""
    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILIES:
        from dsk_compress.errors import ModelSourceError

        raise ModelSourceError(f"teacher: architecture {mt!r} is not supported for MoE routing / student.from_teacher",
                               hint=f"supported: {', '.join(FAMILIES)}; or give a dense student with student: {{hf: DIR}}")
    return FAMILIES[mt]


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All sparse MoE blocks of ``model`` as (module name, block); [] for a dense or non-HF model.

    A model of an unknown family that has expert lists is refused (dense routing would be wrong).
    """
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in FAMILIES:
        if any(isinstance(getattr(m, "experts", None), nn.ModuleList) for m in model.modules()):
            family(cfg)  # raises, listing the supported families
        return []
    fam = family(cfg)
    base = model.base_model_prefix if hasattr(model, model.base_model_prefix) else None
    layers = getattr(model, base).layers if base else model.layers
    prefix = f"{base}.layers" if base else "layers"
    return [(f"{prefix}.{i}.{fam.ffn}", getattr(layer, fam.ffn)) for i, layer in enumerate(layers) if fam.sparse(cfg, i)]


def is_moe(model: nn.Module) -> bool:
    return bool(moe_blocks(model))


def expert_weights(module: nn.Module, names: tuple[str, str, str] = DENSE_PROJ) -> tuple[torch.Tensor, ...]:
    """(gate, up, down) weight matrices of one expert or dense MLP."""
    return tuple(getattr(module, n).weight for n in names)


def route(fam: Family, block: nn.Module, x: torch.Tensor):
    """The family's own top-k routing of tokens ``x`` [N, H]: (indices [N, k], weights [N, k], router logits or None)."""
    if fam.routing == "router":  # DeepSeek-V3: sigmoid scores, group-limited top-k with e_score_correction_bias,
        idx, w = block.gate(x)   # norm_topk_prob and routed_scaling_factor, all inside its router module
        return idx, w, None
    logits = block.gate(x)
    probs = F.softmax(logits, dim=1, dtype=torch.float)
    w, idx = torch.topk(probs, block.top_k, dim=-1)
    if getattr(block, "norm_topk_prob", True):  # Mixtral always renormalises; Qwen reads norm_topk_prob
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w, logits


def shared_output(fam: Family, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if fam.shared is None:
        return None
    out = getattr(block, fam.shared)(x)
    return out if fam.shared_gate is None else torch.sigmoid(getattr(block, fam.shared_gate)(x)) * out


def _dense_forward(self, hidden_states: torch.Tensor):
    fam = self._dsk_family
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    idx, w, logits = route(fam, self, x)
    weights = torch.zeros(x.shape[0], len(self.experts), dtype=w.dtype, device=x.device).scatter(1, idx, w).to(x.dtype)
    out = self.experts[0](x) * weights[:, 0:1]
    for e in range(1, len(self.experts)):
        out = out + self.experts[e](x) * weights[:, e : e + 1]
    shared = shared_output(fam, self, x)
    if shared is not None:
        out = out + shared
    out = out.reshape(shape)
    return (out, logits) if fam.returns_logits else out


_DENSE_CLASSES: dict[type, type] = {}


def densify_moe(model: nn.Module) -> nn.Module:
    """Switch every MoE block of ``model`` (in place) to the exact dense-routing path (any supported family)."""
    blocks = moe_blocks(model)
    fam = family(model.config) if blocks else None
    for _, block in blocks:
        cls = type(block)
        if getattr(cls, "_dsk_dense", False):
            continue
        if cls not in _DENSE_CLASSES:
            _DENSE_CLASSES[cls] = type(f"Dense{cls.__name__}", (cls,), {"forward": _dense_forward, "_dsk_dense": True, "_dsk_family": fam})
        block.__class__ = _DENSE_CLASSES[cls]
    return model


@dataclass
class RouterStats:
    """Per MoE block, measured on calibration data."""

    freq: torch.Tensor          # fraction of the top-k routing slots each routed expert receives (sums to 1)
    mass: float                 # mean total routed weight per token (1 with renormalised top-k; DeepSeek: x routed_scaling_factor)
    shared_gate: float | None   # mean shared-expert gate (1.0 ungated, mean sigmoid for Qwen2-MoE), None without one


@torch.no_grad()
def router_stats(model: nn.Module, batches) -> dict[str, RouterStats]:
    """Routing statistics of every MoE block on ``batches`` of input ids, from the family's own router."""
    blocks = moe_blocks(model)
    if not blocks:
        return {}
    fam = family(model.config)
    acc: dict[str, list] = {name: [0, 0.0, 0.0, 0] for name, _ in blocks}  # counts, mass sum, gate sum, tokens

    def hook(block, args, name):
        x = args[0].reshape(-1, args[0].shape[-1])
        idx, w, _ = route(fam, block, x)
        a = acc[name]
        a[0] = a[0] + torch.bincount(idx.reshape(-1), minlength=len(block.experts)).double()
        a[1] += float(w.double().sum())
        if fam.shared_gate is not None:
            a[2] += float(torch.sigmoid(getattr(block, fam.shared_gate)(x)).double().sum())
        a[3] += x.shape[0]

    hooks = [b.register_forward_pre_hook(lambda m, args, n=n: hook(m, args, n)) for n, b in blocks]
    try:
        dev = next(model.parameters()).device
        for x in batches:
            model(input_ids=torch.as_tensor(x, device=dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    shared = (lambda a: None) if fam.shared is None else (lambda a: 1.0) if fam.shared_gate is None else (lambda a: a[2] / a[3])
    return {n: RouterStats((a[0] / a[0].sum()).float(), a[1] / a[3], shared(a)) for n, a in acc.items()}


def router_frequencies(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Fraction of top-k routing slots each expert receives, per MoE block, on ``batches`` of input ids."""
    return {n: s.freq for n, s in router_stats(model, batches).items()}


# ---------------------------------------------------------------------------------------------
# expert pruning


def expert_groups(cfg) -> int:
    """Routing groups of a layer's experts (DeepSeek-V3's ``n_group``; 1 for softmax routers)."""
    return int(getattr(cfg, "n_group", None) or 1) if family(cfg).routing == "router" else 1


def experts_keep(cfg, ratio: float) -> int:
    """Routed experts per MoE layer left after removing ``ratio`` of them (the count removed is rounded
    up, the same number in every routing group). A RecipeError names ``expert_ratio`` when the router
    could no longer pick its ``num_experts_per_tok`` experts."""
    from dsk_compress.errors import RecipeError

    fam = family(cfg)
    n = int(getattr(cfg, fam.n_experts))
    groups = expert_groups(cfg)
    per = n // groups
    keep_per = per - math.ceil(per * ratio - 1e-9) if ratio > 0 else per
    keep = keep_per * groups
    top_k = int(cfg.num_experts_per_tok)
    # DeepSeek scores a group by its two best experts and picks top_k inside topk_group groups
    reachable = keep_per * int(getattr(cfg, "topk_group", 1) or 1) if groups > 1 else keep
    if keep_per < (2 if groups > 1 else 1) or reachable < top_k:
        what = f"{n} experts" + (f" in {groups} routing groups" if groups > 1 else "")
        raise RecipeError(f"expert_ratio {ratio} leaves {keep} experts per MoE layer, too few for the router "
                          f"(num_experts_per_tok {top_k}; the model has {what})", hint="lower expert_ratio")
    return keep


@torch.no_grad()
def prune_experts(model: nn.Module, keep: int, batches) -> dict:
    """Keep the ``keep`` most-used routed experts of every MoE layer (router frequencies measured on
    ``batches``; DeepSeek-V3: the same number in each routing group), in place.

    The router's rows (and DeepSeek's score-correction bias) are sliced with the experts, so every
    kept expert is routed exactly as before among the survivors; ``config`` and the blocks' expert
    counts are rewritten so the model saves, reloads and exports like a normal model of its family.
    Shared experts are untouched. Returns per layer the kept expert indices and the share of routing
    slots they received before pruning.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE layers")
    fam = family(model.config)
    groups = expert_groups(model.config)
    freqs = router_frequencies(model, batches)
    out = {}
    for name, block in blocks:
        n = len(block.experts)
        if keep > n or keep % groups:
            raise ValueError(f"cannot keep {keep} of {n} experts in {groups} groups")
        per, f = n // groups, freqs[name].double()
        idx = sorted(g * per + int(j) for g in range(groups) for j in torch.argsort(-f[g * per:(g + 1) * per], stable=True)[: keep // groups])
        sel = torch.as_tensor(idx, dtype=torch.long)
        block.experts = nn.ModuleList([block.experts[i] for i in idx])
        gate = block.gate
        gate.weight = nn.Parameter(gate.weight.detach().index_select(0, sel).clone(), requires_grad=gate.weight.requires_grad)
        if isinstance(gate, nn.Linear):
            gate.out_features = keep
        if getattr(gate, "e_score_correction_bias", None) is not None:
            gate.e_score_correction_bias = gate.e_score_correction_bias.index_select(0, sel).clone()
        for obj in (block, gate):
            for attr in ("num_experts", "n_routed_experts"):
                if hasattr(obj, attr):
                    setattr(obj, attr, keep)
        out[name] = {"kept": idx, "kept_routing_share": round(float(f[sel].sum()), 6),
                     "frequencies": [round(float(x), 6) for x in f]}
    setattr(model.config, fam.n_experts, keep)
    if hasattr(model, "num_experts"):  # the causal-LM head's load-balancing loss
        model.num_experts = keep
    return out


def expert_structure(model: nn.Module) -> dict:
    """Routed experts per MoE layer, experts per token, and total / active parameters."""
    from dsk_compress.models.common import count_params

    blocks = moe_blocks(model)
    cfg = model.config
    total = count_params(model)
    per_expert = [sum(p.numel() for p in b.experts[0].parameters()) for _, b in blocks]
    top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
    inactive = sum((len(b.experts) - top_k) * pe for (_, b), pe in zip(blocks, per_expert))
    return {"moe_layers": len(blocks), "experts": [len(b.experts) for _, b in blocks], "experts_per_token": top_k,
            "params": total, "active_params": total - inactive}
