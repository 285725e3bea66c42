"""Structured pruning of dense decoders (Llama family; DeepSeek-V3 students without head pruning): FFN channels,
attention heads and whole decoder layers. MoE experts are pruned in ``compress.moe.prune_experts``.

- FFN channels: torch-pruning's dependency graph for weight importance (l1, l2, taylor); by hand
  (slicing gate/up rows and down columns) for ``activation`` importance and for students with
  DeepSeek's multi-head latent attention, whose splits torch-pruning's graph cannot trace.
- Attention heads: always by hand, as whole key/value groups with their query heads, so grouped-query
  attention (fewer KV heads than query heads) prunes consistently; torch-pruning hangs on GQA graphs
  and prunes no heads when the FFN ratio is 0.
- Decoder layers: removed by block influence (ShortGPT: ``1 - cos(input, output)`` of the layer's
  hidden states on calibration data; the least influential go first), ``layer_idx`` renumbered so
  the KV cache still lines up.
- Targets: a parameter or MAC fraction is solved for one common ratio over the chosen structures
  (candidates built from the config and counted, MACs with ``torch.utils.flop_counter``); a latency
  budget is met step by step by exporting each candidate to ONNX and timing it (``measure_latency``).

The model's config is rewritten after each step so the pruned model saves, reloads and exports
like any other model of its family.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dsk_compress.errors import DskError, ExportError, RecipeError
from dsk_compress.models.source import count_params

IMPORTANCES = ("l1", "l2", "taylor", "activation")
STRUCTURES = ("ffn", "heads", "layers")


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


# ---------------------------------------------------------------------------------------------
# structure, shapes and rounding


@dataclass(frozen=True)
class Shape:
    """Uniform per-layer widths of a Llama-family decoder: what a pruning step aims for."""

    layers: int
    kv_heads: int
    heads: int
    ffn: int

    def as_dict(self) -> dict:
        return asdict(self)


def has_kv_heads(attn: nn.Module) -> bool:
    """Attention with per-head q/k/v projections (Llama, Mistral, Qwen); False for DeepSeek's MLA."""
    return hasattr(attn, "k_proj") and hasattr(attn, "q_proj")


def structure(model: nn.Module) -> dict:
    """Per-layer head and FFN-channel counts of a Llama-family decoder (MLA attention: the config's head counts)."""
    layers = []
    cfg = model.config
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if has_kv_heads(attn):
            heads, kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        else:
            heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        layers.append({"heads": heads, "kv_heads": kv, "ffn": mlp.gate_proj.out_features})
    return {"layers": layers, "params": count_params(model)}


def shape_of(model: nn.Module) -> Shape:
    s = structure(model)["layers"]
    return Shape(layers=len(s), kv_heads=s[0]["kv_heads"], heads=s[0]["heads"], ffn=s[0]["ffn"])


def _config_shape(cfg) -> Shape:
    heads = cfg.num_attention_heads
    return Shape(layers=cfg.num_hidden_layers, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, heads=heads,
                 ffn=cfg.intermediate_size)


def ffn_keep(ffn: int, ratio: float, round_to: int) -> int:
    """FFN channels left after removing ``ratio`` of ``ffn``, rounded down to a multiple of ``round_to``
    (torch-pruning's rule); ``ratio`` 0 keeps the width as it is."""
    if ratio <= 0:
        return ffn
    n = int(ffn * (1 - ratio) + 1e-9)
    return min(ffn, n - n % round_to)


def kv_keep(kv_heads: int, ratio: float) -> int:
    """KV groups left after removing ``ratio`` of them (the count removed is rounded up)."""
    return kv_heads - math.ceil(kv_heads * ratio - 1e-9) if ratio > 0 else kv_heads


def layers_to_remove(num_layers: int, layers_removed: int = 0, depth_ratio: float = 0.0) -> int:
    """Decoder layers to remove for ``layers_removed`` or ``depth_ratio`` (rounded down); checked."""
    if layers_removed and depth_ratio:
        raise RecipeError("give layers_removed or depth_ratio, not both", hint="keep one of them")
    if depth_ratio:
        n = int(num_layers * depth_ratio + 1e-9)
        if n < 1:
            raise RecipeError(f"depth_ratio {depth_ratio} removes no layer of the model's {num_layers}",
                              hint=f"use depth_ratio >= {1 / num_layers:.3g} or layers_removed: 1")
        if n >= num_layers:
            raise RecipeError(f"depth_ratio {depth_ratio} removes every decoder layer (the model has {num_layers})", hint="lower depth_ratio")
        return n
    if layers_removed >= num_layers:
        raise RecipeError(f"layers_removed {layers_removed} removes every decoder layer (the model has {num_layers})",
                          hint=f"remove at most {num_layers - 1}")
    return layers_removed


def check_head_pruning(cfg, head_ratio: float) -> None:
    """Multi-head latent attention (DeepSeek) shares low-rank key/value projections across heads: no head pruning."""
    if head_ratio > 0 and getattr(cfg, "kv_lora_rank", None):
        raise RecipeError(f"head_ratio {head_ratio}: the student ({cfg.model_type}) has multi-head latent attention, whose heads "
                          "share low-rank key/value projections and are not pruned", hint="set head_ratio: 0 and prune FFN channels or layers")


def check_prunable(cfg, ffn_ratio: float, head_ratio: float, round_to: int, layers_removed: int = 0) -> None:
    """Raise a RecipeError naming the field when the ratios cannot be applied to a model with this config."""
    s = _config_shape(cfg)
    check_head_pruning(cfg, head_ratio)
    if s.heads % s.kv_heads:
        raise RecipeError(f"num_attention_heads {s.heads} is not a multiple of num_key_value_heads {s.kv_heads}", hint="a Llama-family config is needed")
    if head_ratio > 0 and kv_keep(s.kv_heads, head_ratio) < 1:
        what = f"{s.heads} heads" if s.kv_heads == s.heads else f"{s.kv_heads} KV groups of {s.heads // s.kv_heads} query heads"
        raise RecipeError(f"head_ratio {head_ratio} leaves no attention heads (the model has {what}; heads go in whole KV groups)",
                          hint="lower head_ratio")
    if ffn_ratio > 0 and s.ffn * (1 - ffn_ratio) < round_to:
        raise RecipeError(f"ffn_ratio {ffn_ratio} leaves fewer than round_to={round_to} FFN channels", hint="lower ffn_ratio or round_to")
    layers_to_remove(s.layers, layers_removed)


def ratio_shape(cfg, ffn_ratio: float, head_ratio: float, layers_removed: int, round_to: int) -> Shape:
    """The structure the ratios lead to (after ``check_prunable``)."""
    check_prunable(cfg, ffn_ratio, head_ratio, round_to, layers_removed)
    s = _config_shape(cfg)
    kv = kv_keep(s.kv_heads, head_ratio)
    return Shape(layers=s.layers - layers_removed, kv_heads=kv, heads=kv * (s.heads // s.kv_heads), ffn=ffn_keep(s.ffn, ffn_ratio, round_to))


def uniform_shape(start: Shape, ratio: float, structures, round_to: int) -> Shape:
    """``start`` with ``ratio`` of each named structure (ffn, heads, layers) removed, never below one
    layer, one KV group or ``round_to`` channels."""
    ffn, kv, layers = start.ffn, start.kv_heads, start.layers
    if "ffn" in structures and start.ffn > round_to:
        ffn = max(round_to, ffn_keep(start.ffn, ratio, round_to))
    if "heads" in structures:
        kv = max(1, kv_keep(start.kv_heads, ratio))
    if "layers" in structures:
        layers = max(1, start.layers - int(start.layers * ratio + 1e-9))
    return Shape(layers=layers, kv_heads=kv, heads=kv * (start.heads // start.kv_heads), ffn=ffn)


def interpolate(start: Shape, final: Shape, frac: float, round_to: int) -> Shape:
    """Step ``frac`` (0..1] of a progressive schedule from ``start`` to ``final``: widths shrink
    geometrically (``start * (final / start) ** frac``), layers linearly; ``frac`` 1 is ``final``."""
    if frac >= 1:
        return final
    ffn = start.ffn
    if final.ffn < start.ffn:
        n = int(start.ffn * (final.ffn / start.ffn) ** frac + 1e-9)
        ffn = min(start.ffn, max(final.ffn, n - n % round_to))
    kv = min(start.kv_heads, max(final.kv_heads, round(start.kv_heads * (final.kv_heads / start.kv_heads) ** frac)))
    layers = start.layers - round((start.layers - final.layers) * frac)
    return Shape(layers=layers, kv_heads=kv, heads=kv * (start.heads // start.kv_heads), ffn=ffn)


# ---------------------------------------------------------------------------------------------
# measurements: block influence, activations, MACs


def _batches(calibration, example_inputs) -> list[torch.Tensor]:
    if calibration is not None:
        out = [torch.as_tensor(b) for b in calibration]
        if out:
            return out
    if example_inputs is None:
        raise ValueError("calibration batches or example inputs are needed")
    return [torch.as_tensor(example_inputs)]


@contextmanager
def _eval_mode(model: nn.Module):
    """Run the block in eval mode and restore the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _run_hooked(model: nn.Module, batches, handles) -> None:
    """Forward ``batches`` through ``model`` in eval mode, then remove the hook ``handles``."""
    try:
        with _eval_mode(model):
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


def remove_layers(model: nn.Module, drop) -> list[int]:
    """Delete decoder layers ``drop`` (indices) and fix what refers to layer positions: each attention
    module's ``layer_idx`` (the KV cache slot), ``num_hidden_layers`` and ``layer_types``."""
    n = len(model.model.layers)
    drop = sorted(set(int(i) for i in drop))
    if any(i < 0 or i >= n for i in drop):
        raise ValueError(f"layer indices {drop} out of range for {n} layers")
    if len(drop) >= n:
        raise RecipeError(f"removing {len(drop)} layers leaves none (the model has {n})", hint="remove fewer layers")
    keep = [i for i in range(n) if i not in drop]
    model.model.layers = nn.ModuleList([model.model.layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        for mod in (layer, layer.self_attn):
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
        if hasattr(model.model, "has_sliding_layers"):
            model.model.has_sliding_layers = "sliding_attention" in cfg.layer_types
    return drop


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


@torch.no_grad()
def count_macs(model: nn.Module, seq_len: int, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass (all matmuls, attention scores included), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch_size, seq_len, dtype=torch.long)
    with _eval_mode(model), FlopCounterMode(display=False) as fc:
        model(input_ids=x, use_cache=False)
    return int(fc.get_total_flops()) // 2


def shaped_config(cfg, shape: Shape):
    """A copy of ``cfg`` describing a model of ``shape`` (same head_dim, layer types of the first layers)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    c = copy.deepcopy(cfg)
    c.num_hidden_layers = shape.layers
    c.num_attention_heads = shape.heads
    c.num_key_value_heads = shape.kv_heads
    c.intermediate_size = shape.ffn
    c.head_dim = head_dim
    if getattr(c, "layer_types", None) is not None:
        c.layer_types = list(c.layer_types[: shape.layers])
    return c


def measure_cost(cfg, shape: Shape, seq_len: int) -> tuple[int, int]:
    """``(params, MACs)`` of a model of ``shape``, built from the config (weights left zero) and counted."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        m = AutoModelForCausalLM.from_config(shaped_config(cfg, shape), attn_implementation="eager", torch_dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()  # uninitialised memory can hold denormals, which are slow to multiply
    return count_params(m), count_macs(m, seq_len)


def solve_target(model: nn.Module, kind: str, fraction: float, structures, round_to: int, seq_len: int,
                 max_ratio: float = 0.9) -> tuple[Shape, dict]:
    """The least pruning (one common ratio over ``structures``) whose params or MACs are at most
    ``fraction`` of the model's. Raises a RecipeError naming ``target.<kind>`` when even ``max_ratio``
    does not get there."""
    if kind not in ("params", "macs"):
        raise ValueError(f"unknown target kind {kind!r}")
    bad = [s for s in structures if s not in STRUCTURES]
    if bad or not structures:
        raise RecipeError(f"target.structures {list(structures)} is not a non-empty list of {', '.join(STRUCTURES)}")
    start = shape_of(model)
    cfg = model.config
    if "heads" in structures:
        check_head_pruning(cfg, max_ratio)
    costs: dict[Shape, tuple[int, int]] = {}
    idx = 0 if kind == "params" else 1

    def cost(shape: Shape) -> int:
        if shape not in costs:
            costs[shape] = measure_cost(cfg, shape, seq_len)
        return costs[shape][idx]

    base = cost(start)
    budget = fraction * base
    smallest = uniform_shape(start, max_ratio, structures, round_to)
    if cost(smallest) > budget:
        raise RecipeError(
            f"target.{kind} {fraction} is unreachable by pruning {', '.join(structures)} up to target.max_ratio {max_ratio}: "
            f"the smallest candidate keeps {cost(smallest) / base:.3f} of the {kind}",
            hint=f"raise target.{kind}, raise target.max_ratio or add structures (ffn, heads, layers)")
    lo, hi = 0.0, max_ratio
    for _ in range(40):  # the cost only falls as the ratio grows; find the first step that fits
        mid = (lo + hi) / 2
        if cost(uniform_shape(start, mid, structures, round_to)) <= budget:
            hi = mid
        else:
            lo = mid
    shape = uniform_shape(start, hi, structures, round_to)
    info = {"kind": kind, "fraction": fraction, "structures": list(structures), "ratio": round(hi, 6), "solved": shape.as_dict(),
            f"{kind}_before": base, f"{kind}_solved": cost(shape), "achieved_fraction": round(cost(shape) / base, 6),
            "candidates_counted": len(costs), "seq_len": seq_len}
    return shape, info


# ---------------------------------------------------------------------------------------------
# pruning


def _keep_out(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach().index_select(0, idx).clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach().index_select(0, idx).clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(idx)


def _keep_in(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach().index_select(1, idx).clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = len(idx)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order (ties keep the lower index)."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return order.sort().values


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
    return (f(mlp.gate_proj.weight).double().sum(1) + f(mlp.up_proj.weight).double().sum(1)
            + f(mlp.down_proj.weight).double().sum(0))


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


def prune_kv_groups(attn: nn.Module, keep) -> None:
    """Keep KV groups ``keep`` of one attention module: their k/v heads, their query heads (q rows) and
    the matching o_proj input columns."""
    d = attn.head_dim
    kv = attn.k_proj.out_features // d
    group = attn.q_proj.out_features // d // kv
    keep = sorted(int(j) for j in keep)
    kv_idx = torch.cat([torch.arange(j * d, (j + 1) * d) for j in keep])
    q_idx = torch.cat([torch.arange(j * group * d, (j + 1) * group * d) for j in keep])
    _keep_out(attn.q_proj, q_idx)
    _keep_out(attn.k_proj, kv_idx)
    _keep_out(attn.v_proj, kv_idx)
    _keep_in(attn.o_proj, q_idx)


def prune_ffn_channels(mlp: nn.Module, keep) -> None:
    """Keep FFN channels ``keep``: gate/up rows and down_proj columns."""
    idx = torch.as_tensor(sorted(int(i) for i in keep), dtype=torch.long)
    _keep_out(mlp.gate_proj, idx)
    _keep_out(mlp.up_proj, idx)
    _keep_in(mlp.down_proj, idx)


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


def _lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _tp_prune_ffn(model: nn.Module, example_inputs: torch.Tensor, keep: int, importance: str, timeout_s: float, loss) -> None:
    """FFN channels to ``keep`` per layer with torch-pruning (attention and embeddings left alone)."""
    import torch_pruning as tp

    cur = model.model.layers[0].mlp.gate_proj.out_features
    # torch-pruning keeps int(cur * (1 - ratio)); the half channel makes that exactly ``keep``
    ratio = 1 - (keep + 0.5) / cur
    ignored = [model.lm_head, model.model.embed_tokens]
    for layer in model.model.layers:
        ignored += [m for m in layer.self_attn.modules() if isinstance(m, nn.Linear)]
    # RMSNorm weights are plain parameters torch-pruning cannot see through; they live on the hidden dim
    unwrapped = [(m.weight, 0) for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    with _time_limit(timeout_s):
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example_inputs,
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
            importance=tp_importance(importance),
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=None,
            unwrapped_parameters=unwrapped,
        )
        if importance == "taylor":
            model.zero_grad()
            loss(model).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)


def prune_to(model: nn.Module, target: Shape, importance: str = "l2", timeout_s: float = 300, example_inputs=None,
             calibration=None, loss_for_taylor=None) -> dict:
    """Prune ``model`` in place to ``target`` (uniform per layer). Returns the structure after pruning
    (plus ``removed_layers`` and ``block_influence`` when layers were removed).

    Layers go first (lowest block influence on ``calibration``), then KV groups (by hand), then FFN
    channels (torch-pruning for l1/l2/taylor, by hand for activation). ``loss_for_taylor(model)``
    gives the loss whose gradients Taylor importance uses (default: next-token cross-entropy on the
    first calibration batch).
    """
    if importance not in IMPORTANCES:
        raise RecipeError(f"unknown importance {importance!r}", hint=f"valid: {', '.join(IMPORTANCES)}")
    cur = shape_of(model)
    group = cur.heads // cur.kv_heads
    if not (1 <= target.layers <= cur.layers and 1 <= target.kv_heads <= cur.kv_heads and 1 <= target.ffn <= cur.ffn):
        raise RecipeError(f"cannot prune {cur.as_dict()} to {target.as_dict()}", hint="targets must be smaller and leave at least one of each")
    if target.heads != target.kv_heads * group:
        raise ValueError(f"target heads {target.heads} != kv_heads {target.kv_heads} x group {group}")
    batches = _batches(calibration, example_inputs)
    example = torch.as_tensor(example_inputs) if example_inputs is not None else batches[0][:1]
    loss = loss_for_taylor or (lambda m: _lm_loss(m, batches[0]))
    model.eval()
    info: dict = {}
    if target.layers < cur.layers:
        bi = block_influence(model, batches)
        order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
        info = {"removed_layers": remove_layers(model, order[: cur.layers - target.layers]), "block_influence": [round(b, 8) for b in bi]}
    acts = activation_scores(model, batches) if importance == "activation" and (target.kv_heads < cur.kv_heads or target.ffn < cur.ffn) else None
    if target.kv_heads < cur.kv_heads:
        check_head_pruning(model.config, 1 - target.kv_heads / cur.kv_heads)
        if importance == "taylor":
            model.zero_grad()
            loss(model).backward()
        for i, layer in enumerate(model.model.layers):
            scores = kv_group_scores(layer.self_attn, importance, acts["heads"][i] if acts else None)
            prune_kv_groups(layer.self_attn, _top(scores, target.kv_heads).tolist())
        model.zero_grad(set_to_none=True)
    if target.ffn < cur.ffn:
        if importance == "activation":
            for i, layer in enumerate(model.model.layers):
                prune_ffn_channels(layer.mlp, _top(acts["ffn"][i], target.ffn).tolist())
        elif not has_kv_heads(model.model.layers[0].self_attn):  # torch-pruning cannot trace MLA's splits: by hand
            if importance == "taylor":
                model.zero_grad()
                loss(model).backward()
            for layer in model.model.layers:
                prune_ffn_channels(layer.mlp, _top(ffn_channel_scores(layer.mlp, importance), target.ffn).tolist())
            model.zero_grad(set_to_none=True)
        else:
            _tp_prune_ffn(model, example, target.ffn, importance, timeout_s, loss)
    _rewrite_config(model)
    return {**structure(model), **info}


def prune_step(model: nn.Module, example_inputs: torch.Tensor, ffn_ratio: float, head_ratio: float,
               importance: str = "l2", round_to: int = 8, timeout_s: float = 300,
               loss_for_taylor=None, layers_removed: int = 0, calibration=None) -> dict:
    """Remove ``ffn_ratio`` of each layer's FFN channels, ``head_ratio`` of its KV groups (with their
    query heads) and ``layers_removed`` whole decoder layers.

    Ratios are relative to the model's current size. Returns the structure after pruning.
    """
    target = ratio_shape(model.config, ffn_ratio, head_ratio, layers_removed, round_to)
    return prune_to(model, target, importance, timeout_s, example_inputs, calibration, loss_for_taylor)


def _rewrite_config(model: nn.Module) -> None:
    cfg = model.config
    layers = structure(model)["layers"]
    if any(x != layers[0] for x in layers):
        raise DskError("pruning left layers of different widths", hint="use uniform (per-layer) pruning")
    heads, kv, ffn = layers[0]["heads"], layers[0]["kv_heads"], layers[0]["ffn"]
    for layer in model.model.layers:
        a = layer.self_attn
        if has_kv_heads(a):
            a.num_key_value_groups = heads // kv
            if hasattr(a, "num_heads"):
                a.num_heads = heads
            if hasattr(a, "num_key_value_heads"):
                a.num_key_value_heads = kv
        layer.mlp.intermediate_size = ffn
    cfg.num_hidden_layers = len(layers)
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = kv
    cfg.intermediate_size = ffn
    attn0 = model.model.layers[0].self_attn
    if has_kv_heads(attn0):
        cfg.head_dim = attn0.head_dim


# ---------------------------------------------------------------------------------------------
# latency on this host


def measure_latency(model: nn.Module, example, workdir: str | Path, threads: int | None = None, runs: int = 20, warmup: int = 3,
                    parity_atol: float = 1e-3) -> dict:
    """Export ``model`` to ONNX (``export.onnx.export_causal_lm``), check it against torch, and time it
    with ONNX Runtime on this host (``runtimes.onnxruntime.benchmark_onnx``: a fresh worker process,
    extended graph optimizations, batch 1 at the example's sequence length)."""
    import warnings

    import numpy as np

    from dsk_compress.export.onnx import export_causal_lm, ort_predict
    from dsk_compress.runtimes import BenchConfig
    from dsk_compress.runtimes.onnxruntime import benchmark_onnx

    x = np.asarray(example)[:1]
    path = Path(workdir) / "candidate.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the exporter
        export_causal_lm(model, x, path)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(x), use_cache=False).logits.numpy()
    diff = float(np.abs(ort_predict(path, threads)(x) - ref).max())
    if diff > parity_atol:
        raise ExportError(f"pruned candidate: ONNX output differs from torch by {diff:.2e} (> {parity_atol})", hint="report a bug")
    res = benchmark_onnx(path, x, BenchConfig(warmup=warmup, runs=runs, batch_size=1, threads=threads))
    path.unlink(missing_ok=True)
    return {"p50_ms": res.p50, "p90_ms": res.p90, "mean_ms": res.mean, "runs": res.runs, "threads": threads,
            "seq_len": int(x.shape[1]), "parity_max_abs_diff": diff, "runtime": f"onnxruntime-{res.device}"}
