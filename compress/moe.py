"""MoE families and the one expert abstraction: experts, routing, dense forward, router statistics, expert pruning.

One :class:`Family` entry per Hugging Face ``config.model_type`` says where a decoder layer keeps its
FFN, which layers are sparse, which module routes, which shared expert it adds and which dense
student it distils into. Everything else is written once against two adapters:

- :class:`Experts` reads and writes a block's routed experts in either layout: transformers 5's fused
  3-D parameters (``gate_up_proj`` [E, 2I, H] + ``down_proj`` [E, H, I]; gpt-oss: [E, H, 2I] with
  gate/up interleaved, biases) or transformers 4's ``nn.ModuleList`` of per-expert MLPs. It stacks
  them as (gate [E, I, H], up [E, I, H], down [E, H, I]), computes every expert at once with one
  batched MatMul, and keeps a subset in place (``index_select`` on the 3-D parameters).
- :func:`route` calls the family's own router and returns (top-k weights, top-k indices, router
  logits) whatever it returns: transformers 5's ``TopKRouter`` tuple ``(logits, weights, indices)``,
  transformers 4's bare logits (softmax top-k here) or DeepSeek's ``(indices, weights)``. Grouped
  routing (DeepSeek, GLM4-MoE), sigmoid scores with a correction bias and PhiMoE's sparsemixer stay
  inside the family's router, so they are exact by construction.

A traced MoE with data-dependent routing bakes in which experts the example hit. The dense path
(:func:`densify_moe`) computes every expert and weights it by the family's own top-k gate (zero for
the experts a token does not use), which equals the sparse block's output, and traces into a static
graph. No code outside this module looks at how experts are stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _all_layers(cfg, i: int) -> bool:
    return True


def _no_layer(cfg, i: int) -> bool:
    return False


def _qwen_sparse(cfg, i: int) -> bool:
    # Qwen2-MoE / Qwen3-MoE: mlp_only_layers and decoder_sparse_step make some layers dense
    n = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0)
    return i not in (cfg.mlp_only_layers or []) and n > 0 and (i + 1) % cfg.decoder_sparse_step == 0


def _first_k_dense(cfg, i: int) -> bool:
    return i >= cfg.first_k_dense_replace  # DeepSeek-V2/V3, GLM4-MoE: the first first_k_dense_replace layers are dense


def transformers_major() -> int:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).major


@dataclass(frozen=True)
class Family:
    """How one model family lays out its decoder FFNs and which dense student it distils into."""

    student: str  # model_type of the dense student
    sparse: Callable = _no_layer  # (config, layer index) -> is that layer an MoE block
    ffn: tuple[str, ...] = ("mlp",)  # decoder-layer attribute holding the FFN or MoE block (first present wins)
    router: str = "gate"  # block attribute of the router
    shared: str | None = None  # shared expert added to every token
    shared_gate: str | None = None  # its sigmoid gate (Qwen2-MoE), if any
    grouped: bool = False  # group-limited routing (n_group / topk_group): prune the same count per group
    student_all_dense: bool = False  # the student is this family's own config with every layer dense (MLA etc.)
    approx: str | None = None  # what the student cut cannot carry over (None: attention and norms copy exactly)
    fused_layout: str = "gate_up"  # transformers 5 fused experts: "gate_up" ([E, 2I, H], chunked) | "gpt_oss"
    needs_v5: bool = False  # no transformers 4 support in this toolkit


_DENSE = Family("llama")
FAMILIES: dict[str, Family] = {
    "mixtral": Family("llama", _all_layers, ffn=("mlp", "block_sparse_moe")),
    "qwen2_moe": Family("qwen2", _qwen_sparse, shared="shared_expert", shared_gate="shared_expert_gate"),
    "qwen3_moe": Family("qwen3", _qwen_sparse),
    # MLA attention: the student is a DeepseekV3 (GLM4-MoE) config whose every layer is dense, so attention copies exactly;
    # DeepSeek-V2's complex-valued rotary (torch.polar, which ONNX cannot export) is DeepseekV3's interleaved rotary in real numbers
    "deepseek_v2": Family("deepseek_v3", _first_k_dense, shared="shared_experts", grouped=True, student_all_dense=True, needs_v5=True),
    "deepseek_v3": Family("deepseek_v3", _first_k_dense, shared="shared_experts", grouped=True, student_all_dense=True),
    "glm4_moe": Family("glm4_moe", _first_k_dense, shared="shared_experts", grouped=True, student_all_dense=True, needs_v5=True),
    "granitemoe": Family("granite", _all_layers, ffn=("block_sparse_moe",), router="router", needs_v5=True),
    "olmoe": Family(
        "llama",
        _all_layers,
        needs_v5=True,
        approx="OLMoE's q_norm/k_norm (RMSNorm over the whole query/key projection) and clip_qkv are dropped",
    ),
    "phimoe": Family(
        "llama",
        _all_layers,
        router="router",
        needs_v5=True,
        approx="PhiMoE's LayerNorms become RMSNorms (their biases dropped) and the lm_head bias is dropped",
    ),
    "gpt_oss": Family(
        "llama",
        _all_layers,
        router="router",
        fused_layout="gpt_oss",
        needs_v5=True,
        approx="gpt-oss's attention sinks and sliding-window layers are dropped and its clamped SwiGLU becomes "
        "SiLU (exact below the clamp limit)",
    ),
    "llama": _DENSE,
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "granite": Family("granite"),
}
MOE_FAMILIES = tuple(k for k, f in FAMILIES.items() if f.sparse is not _no_layer)
DENSE_PROJ = ("gate_proj", "up_proj", "down_proj")  # every family's dense MLP
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # config keys of the routed-expert count


def family(cfg) -> Family:
    """The :class:`Family` of a Hugging Face config; an unknown ``model_type`` is a ModelSourceError."""
    from dsk_compress.errors import ModelSourceError

    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILIES:
        raise ModelSourceError(
            f"teacher: architecture {mt!r} is not supported for MoE routing / student.from_teacher",
            hint=f"supported: {', '.join(FAMILIES)}; or give a dense student with student: {{hf: DIR}}",
        )
    fam = FAMILIES[mt]
    if fam.needs_v5 and transformers_major() < 5:
        import transformers

        raise ModelSourceError(
            f"teacher: {mt} needs transformers 5 (installed: {transformers.__version__})",
            hint="pip install -c constraints.txt 'transformers>=5.25,<6'",
        )
    return fam


def n_experts(cfg) -> int:
    """Routed experts per MoE layer from the config (whichever key the family uses)."""
    for k in EXPERT_COUNT_KEYS:
        v = getattr(cfg, k, None)
        if v:
            return int(v)
    raise ValueError(f"{getattr(cfg, 'model_type', '?')} config names no expert count ({', '.join(EXPERT_COUNT_KEYS)})")


def ffn_of(fam: Family, layer: nn.Module) -> tuple[str, nn.Module]:
    """(attribute name, module) of a decoder layer's FFN or MoE block."""
    for name in fam.ffn:
        if hasattr(layer, name):
            return name, getattr(layer, name)
    raise AttributeError(f"{type(layer).__name__} has none of {fam.ffn}")


def _layers(model: nn.Module) -> tuple[str, nn.Module]:
    base = model.base_model_prefix if hasattr(model, model.base_model_prefix) else None
    return (f"{base}.layers", getattr(model, base).layers) if base else ("layers", model.layers)


def _has_experts(m: nn.Module) -> bool:
    return isinstance(getattr(m, "experts", None), nn.Module)


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All sparse MoE blocks of ``model`` as (module name, block); [] for a dense or non-HF model.

    A model of an unknown family that has experts is refused (dense routing would be wrong).
    """
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in FAMILIES:
        if any(_has_experts(m) for m in model.modules()):
            family(cfg)  # raises, listing the supported families
        return []
    fam = family(cfg)
    prefix, layers = _layers(model)
    out = []
    for i, layer in enumerate(layers):
        if fam.sparse(cfg, i):
            name, block = ffn_of(fam, layer)
            out.append((f"{prefix}.{i}.{name}", block))
    return out


def is_moe(model: nn.Module) -> bool:
    return bool(moe_blocks(model))


def dense_mlp_weights(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """(gate [I, H], up [I, H], down [H, I]) weight matrices of a dense gated MLP (a shared expert, a dense layer)."""
    return tuple(getattr(module, n).weight for n in DENSE_PROJ)


# ---------------------------------------------------------------------------------------------
# the expert accessor


class ExpertFFN(NamedTuple):
    """One expert (or all, stacked on a leading axis) as a SiLU-style gated FFN: down @ (act(gate x + gb) * (up x + ub)) + db."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


_LIST_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class Experts:
    """The routed experts of one MoE block, in transformers 5's fused 3-D layout or transformers 4's ModuleList."""

    def __init__(self, block: nn.Module, fam: Family) -> None:
        self.block, self.fam = block, fam
        self.module = block.experts
        self.listed = isinstance(self.module, nn.ModuleList)
        if self.listed:
            first = self.module[0]
            self.names = next((n for n in _LIST_NAMES if all(hasattr(first, a) for a in n)), None)
            if self.names is None:
                raise ValueError(f"{type(first).__name__}: expert projections not found")
        elif not hasattr(self.module, "gate_up_proj"):
            raise ValueError(f"{type(self.module).__name__}: no gate_up_proj (an expert layout this toolkit does not know)")

    def __len__(self) -> int:
        return len(self.module) if self.listed else int(self.module.gate_up_proj.shape[0])

    @property
    def layout(self) -> str:
        return "ModuleList" if self.listed else f"fused 3-D ({self.fam.fused_layout})"

    def stacked(self) -> ExpertFFN:
        """All experts as tensors on a leading expert axis (views of the parameters where the layout allows)."""
        m = self.module
        if self.listed:
            g, u, d = (torch.stack([getattr(e, n).weight for e in m]) for n in self.names)
            return ExpertFFN(g, u, d)
        if self.fam.fused_layout == "gpt_oss":  # [E, H, 2I] with gate/up interleaved, down [E, I, H], biases
            gu, b = m.gate_up_proj.transpose(1, 2), m.gate_up_proj_bias
            return ExpertFFN(gu[:, ::2], gu[:, 1::2], m.down_proj.transpose(1, 2), b[:, ::2], b[:, 1::2], m.down_proj_bias)
        inter = m.gate_up_proj.shape[1] // 2
        return ExpertFFN(m.gate_up_proj[:, :inter], m.gate_up_proj[:, inter:], m.down_proj)

    def expert(self, e: int) -> ExpertFFN:
        """Expert ``e`` as (gate [I, H], up [I, H], down [H, I], biases or None)."""
        return ExpertFFN(*(None if t is None else t[e] for t in self.stacked()))

    def params_per_expert(self) -> int:
        return sum(p.numel() for p in self.module.parameters()) // len(self)

    def silu_form(self, e: int) -> ExpertFFN:
        """Expert ``e`` rewritten as a SiLU-gated FFN with biases (what a Llama MLP holds). Exact for SiLU experts; gpt-oss's
        ``(up + 1) * g * sigmoid(alpha * g)`` becomes ``(up + 1) * silu(alpha * g) / alpha`` (its clamp is dropped)."""
        w = self.expert(e)
        if self.fam.fused_layout != "gpt_oss":
            return w
        a = float(self.module.alpha)
        return ExpertFFN(w.gate * a, w.up, w.down / a, w.gate_bias * a, w.up_bias + 1.0, w.down_bias)

    def _act(self):
        m = self.module[0] if self.listed else self.module
        return m.act_fn

    def forward_all(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_e weights[:, e] * expert_e(x)`` for tokens ``x`` [N, H] and dense routing weights [N, E]: one batched
        MatMul per projection over the stacked experts ([E, N, .]; a static graph, no data-dependent indexing). Batched
        MatMul, not einsum: ONNX Runtime's Einsum kernel took 70% of an MoE teacher's CPU time, its MatMul a fraction."""
        m = self.module
        w = weights.to(x.dtype).t().unsqueeze(-1)  # [E, N, 1]
        if not self.listed and self.fam.fused_layout == "gpt_oss":
            gu = x @ m.gate_up_proj + m.gate_up_proj_bias.unsqueeze(1)  # [E, H, 2I] -> [E, N, 2I]
            h = m._apply_gate(gu)  # the family's own clamped SwiGLU on the interleaved gate/up
            return ((h @ m.down_proj + m.down_proj_bias.unsqueeze(1)) * w).sum(0)
        if self.listed:
            s = self.stacked()
            g, u = x @ s.gate.transpose(1, 2), x @ s.up.transpose(1, 2)  # [E, I, H] -> [E, N, I]
            down = s.down
        else:
            gate, up = m.gate_up_proj.chunk(2, dim=1)  # [E, 2I, H]: split the weights, not the activations
            g, u = x @ gate.transpose(1, 2), x @ up.transpose(1, 2)
            down = m.down_proj
        return ((self._act()(g) * u) @ down.transpose(1, 2) * w).sum(0)  # [E, H, I] -> [E, N, H]

    @torch.no_grad()
    def keep(self, idx: list[int]) -> None:
        """Keep experts ``idx`` (in that order) in place: ``index_select`` on every 3-D parameter, or a shorter ModuleList."""
        if self.listed:
            self.block.experts = self.module = nn.ModuleList([self.module[i] for i in idx])
            return
        sel = torch.as_tensor(idx, dtype=torch.long, device=self.module.gate_up_proj.device)
        for name, p in list(self.module.named_parameters(recurse=False)):
            setattr(self.module, name, nn.Parameter(p.detach().index_select(0, sel).clone(), requires_grad=p.requires_grad))
        if hasattr(self.module, "num_experts"):
            self.module.num_experts = len(idx)


def experts(block: nn.Module, fam: Family) -> Experts:
    return Experts(block, fam)


# ---------------------------------------------------------------------------------------------
# routing


class Routing(NamedTuple):
    weights: torch.Tensor  # [N, k] routing weight of each chosen expert (the family's own normalisation and scaling)
    indices: torch.Tensor  # [N, k] chosen experts
    logits: torch.Tensor | None  # [N, E] router logits where the router gives them


def router_of(fam: Family, block: nn.Module) -> nn.Module:
    return getattr(block, fam.router)


def route(fam: Family, block: nn.Module, x: torch.Tensor) -> Routing:
    """The family's own top-k routing of tokens ``x`` [N, H], whatever its router returns."""
    out = router_of(fam, block)(x)
    if isinstance(out, tuple):
        if len(out) == 3:  # transformers 5 TopKRouter: (logits, top-k weights, top-k indices)
            logits, w, idx = out
            return Routing(w, idx, logits)
        if len(out) == 2:  # transformers 4 DeepSeek-V3: (indices, weights)
            a, b = out
            idx, w = (a, b) if not a.is_floating_point() else (b, a)
            return Routing(w, idx, None)
        raise ValueError(f"{type(router_of(fam, block)).__name__} returned {len(out)} values: a router this toolkit does not know")
    logits = out  # transformers 4 Mixtral / Qwen: a Linear gate; softmax top-k as the block does
    probs = F.softmax(logits, dim=1, dtype=torch.float)
    w, idx = torch.topk(probs, block.top_k, dim=-1)
    if getattr(block, "norm_topk_prob", True):  # Mixtral always renormalises; Qwen reads norm_topk_prob
        w = w / w.sum(dim=-1, keepdim=True)
    return Routing(w, idx, logits)


def dense_weights(r: Routing, n: int) -> torch.Tensor:
    """The top-k weights of ``r`` scattered into [N, n] (zero for the experts a token does not use)."""
    return torch.zeros(r.weights.shape[0], n, dtype=r.weights.dtype, device=r.weights.device).scatter(1, r.indices, r.weights)


def shared_output(fam: Family, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if fam.shared is None:
        return None
    out = getattr(block, fam.shared)(x)
    return out if fam.shared_gate is None else torch.sigmoid(getattr(block, fam.shared_gate)(x)) * out


def _returns(fam: Family, model_type: str) -> str:
    """What the family's sparse block returns: "hidden", "hidden+logits" (transformers 4 Mixtral / Qwen) or "hidden+weights" (gpt-oss)."""
    if model_type == "gpt_oss":
        return "hidden+weights"
    if transformers_major() < 5 and model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return "hidden+logits"
    return "hidden"


def dense_forward(block: nn.Module, fam: Family, hidden_states: torch.Tensor, returns: str = "hidden"):
    """The block's output with every expert computed and weighted by the family's top-k gate (exact; traces statically)."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    ex = Experts(block, fam)
    r = route(fam, block, x)
    out = ex.forward_all(x, dense_weights(r, len(ex)))
    shared = shared_output(fam, block, x)
    if shared is not None:
        out = out + shared
    out = out.reshape(shape).to(hidden_states.dtype)
    if returns == "hidden+logits":
        return out, r.logits
    if returns == "hidden+weights":
        return out, r.weights
    return out


def _dense_block_forward(self, hidden_states: torch.Tensor):
    return dense_forward(self, self._dsk_family, hidden_states, self._dsk_returns)


_DENSE_CLASSES: dict[type, type] = {}


def densify_moe(model: nn.Module) -> nn.Module:
    """Switch every MoE block of ``model`` (in place) to the exact dense-routing path (any supported family)."""
    blocks = moe_blocks(model)
    if not blocks:
        return model
    fam = family(model.config)
    returns = _returns(fam, model.config.model_type)
    for _, block in blocks:
        cls = type(block)
        if getattr(cls, "_dsk_dense", False):
            continue
        if cls not in _DENSE_CLASSES:
            _DENSE_CLASSES[cls] = type(
                f"Dense{cls.__name__}",
                (cls,),
                {"forward": _dense_block_forward, "_dsk_dense": True, "_dsk_family": fam, "_dsk_returns": returns},
            )
        block.__class__ = _DENSE_CLASSES[cls]
    return model


def uses_sparse_grads(model: nn.Module) -> bool:
    """True when some parameters get no gradient from a batch that routes no token to them (DDP's find_unused_parameters)."""
    try:
        return is_moe(model)
    except Exception:  # an unknown MoE family: be safe
        return any(_has_experts(m) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# router statistics


@dataclass
class RouterStats:
    """Per MoE block, measured on calibration data."""

    freq: torch.Tensor  # fraction of the top-k routing slots each routed expert receives (sums to 1)
    mass: float  # mean total routed weight per token (1 with renormalised top-k; DeepSeek: x routed_scaling_factor)
    shared_gate: float | None  # mean shared-expert gate (1.0 ungated, mean sigmoid for Qwen2-MoE), None without one


@torch.no_grad()
def router_stats(model: nn.Module, batches) -> dict[str, RouterStats]:
    """Routing statistics of every MoE block on ``batches`` of input ids, from the family's own router."""
    blocks = moe_blocks(model)
    if not blocks:
        return {}
    fam = family(model.config)
    acc: dict[str, list] = {name: [0, 0.0, 0.0, 0] for name, _ in blocks}  # counts, mass sum, gate sum, tokens
    sizes = {name: len(Experts(b, fam)) for name, b in blocks}

    def hook(block, args, name):
        x = args[0].reshape(-1, args[0].shape[-1])
        r = route(fam, block, x)
        a = acc[name]
        a[0] = a[0] + torch.bincount(r.indices.reshape(-1), minlength=sizes[name]).double()
        a[1] += float(r.weights.double().sum())
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
    """Routing groups of a layer's experts (DeepSeek / GLM4-MoE ``n_group``; 1 for ungrouped routers)."""
    if not family(cfg).grouped or getattr(cfg, "topk_method", None) == "greedy":
        return 1
    return int(getattr(cfg, "n_group", None) or 1)


def experts_keep(cfg, expert_ratio: float) -> int:
    """Routed experts per MoE layer left after removing ``expert_ratio`` of them (the count removed is
    rounded up, the same number in every routing group). An InvalidArgument about ``expert_ratio`` when
    the router could no longer pick its ``num_experts_per_tok`` experts."""
    from dsk_compress.errors import InvalidArgument

    ratio = expert_ratio

    n = n_experts(cfg)
    groups = expert_groups(cfg)
    per = n // groups
    keep_per = per - math.ceil(per * ratio - 1e-9) if ratio > 0 else per
    keep = keep_per * groups
    top_k = int(cfg.num_experts_per_tok)
    # DeepSeek scores a group by its two best experts and picks top_k inside topk_group groups
    reachable = keep_per * int(getattr(cfg, "topk_group", 1) or 1) if groups > 1 else keep
    if keep_per < (2 if groups > 1 else 1) or reachable < top_k:
        what = f"{n} experts" + (f" in {groups} routing groups" if groups > 1 else "")
        raise InvalidArgument(
            f"expert_ratio {ratio} leaves {keep} experts per MoE layer, too few for the router "
            f"(num_experts_per_tok {top_k}; the model has {what})",
            "expert_ratio",
            hint="lower expert_ratio",
        )
    return keep


@torch.no_grad()
def _keep_router_rows(router: nn.Module, sel: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(router, name, None)
        if isinstance(p, nn.Parameter) and p.shape[0] != 1:
            setattr(router, name, nn.Parameter(p.detach().index_select(0, sel).clone(), requires_grad=p.requires_grad))
    if getattr(router, "e_score_correction_bias", None) is not None:
        router.e_score_correction_bias = router.e_score_correction_bias.index_select(0, sel).clone()
    if isinstance(router, nn.Linear):
        router.out_features = len(sel)


@torch.no_grad()
def prune_experts(model: nn.Module, keep: int, batches) -> dict:
    """Keep the ``keep`` most-used routed experts of every MoE layer (router frequencies measured on
    ``batches``; grouped routers: the same number in each routing group), in place.

    The router's rows (its bias and DeepSeek's score-correction bias too) are sliced with the experts,
    so every kept expert is routed exactly as before among the survivors; ``config`` and the blocks'
    expert counts are rewritten so the model saves, reloads and exports like a normal model of its
    family. Shared experts are untouched. Returns per layer the kept expert indices and the share of
    routing slots they received before pruning.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE layers")
    fam = family(model.config)
    groups = expert_groups(model.config)
    freqs = router_frequencies(model, batches)
    out = {}
    for name, block in blocks:
        ex = Experts(block, fam)
        n = len(ex)
        if keep > n or keep % groups:
            raise ValueError(f"cannot keep {keep} of {n} experts in {groups} groups")
        per, f = n // groups, freqs[name].double()
        idx = sorted(
            g * per + int(j) for g in range(groups) for j in torch.argsort(-f[g * per : (g + 1) * per], stable=True)[: keep // groups]
        )
        sel = torch.as_tensor(idx, dtype=torch.long)
        ex.keep(idx)
        router = router_of(fam, block)
        _keep_router_rows(router, sel.to(router.weight.device))
        for obj in (block, router):
            for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
                if hasattr(obj, attr):
                    setattr(obj, attr, keep)
        out[name] = {"kept": idx, "kept_routing_share": round(float(f[sel].sum()), 6), "frequencies": [round(float(x), 6) for x in f]}
    for k in EXPERT_COUNT_KEYS:
        if getattr(model.config, k, None):
            setattr(model.config, k, keep)
    if hasattr(model, "num_experts"):  # the causal-LM head's load-balancing loss
        model.num_experts = keep
    return out


def expert_structure(model: nn.Module) -> dict:
    """Routed experts per MoE layer, experts per token, and total / active parameters."""
    from dsk_compress.models.common import count_params

    blocks = moe_blocks(model)
    fam = family(model.config) if blocks else None
    cfg = model.config
    total = count_params(model)
    ex = [Experts(b, fam) for _, b in blocks]
    top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
    inactive = sum((len(e) - top_k) * e.params_per_expert() for e in ex)
    return {
        "moe_layers": len(blocks),
        "experts": [len(e) for e in ex],
        "experts_per_token": top_k,
        "params": total,
        "active_params": total - inactive,
    }


def describe_layout(model: nn.Module) -> str:
    """How the model's routed experts are stored ("fused 3-D (gate_up)", "ModuleList"), or "dense"."""
    blocks = moe_blocks(model)
    return Experts(blocks[0][1], family(model.config)).layout if blocks else "dense"


def student_notes(cfg) -> list[str]:
    """What ``student.from_teacher`` and the exports cannot do for a teacher of this config (a config object or its dict):
    stated by ``recipe --dry-run``, in the report's variant notes and in docs/distillation.md, never found as a missing file."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    mt = get("model_type")
    fam = FAMILIES.get(mt)
    if fam is None:
        return []
    notes = []
    if fam.approx:
        notes.append(f"{mt} has no dense counterpart in transformers: the student is a Llama; {fam.approx}")
    if get("kv_lora_rank"):
        notes.append(
            f"{mt} uses multi-head latent attention: its {fam.student} student keeps it, so attention heads are not pruned "
            "and no fused decoder graph is built (no per-head q/k/v/o projections)"
        )
    rope = get("rope_parameters") or {}
    partial = (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None) or get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        notes.append(f"{mt} rotates {partial} of each head: no fused decoder graph (full-sequence and KV-cache graphs only)")
    if any(get(k) not in (None, 1, 1.0) for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")):
        notes.append(f"{mt} scales embeddings, residuals and logits: no fused decoder graph (full-sequence and KV-cache graphs only)")
    if mt == "deepseek_v2":
        notes.append(
            "deepseek_v2's complex-valued rotary does not export to ONNX: measure the teacher with export.teacher: torch "
            "(its student is a DeepseekV3 with the same attention in real numbers, and exports)"
        )
    return notes
