"""Structural surgery: remove decoder layers, KV groups and FFN channels in place, then rewrite the config.

``prune_to`` brings a decoder to a ``Shape`` (uniform per layer); ``prune_step`` to the shape that ratios
lead to. Layers go first, then attention heads, then FFN channels. How each structure is cut depends on
the model family's attention:

==========================================  ==========================  =========================  ============
family (attention)                          heads                       FFN: l1, l2, taylor        FFN: activation
==========================================  ==========================  =========================  ============
Llama, Mistral, Qwen2, Qwen3 (q/k/v         by hand, whole KV groups    torch-pruning's            by hand
per head, grouped-query)                    with their query heads      dependency graph
DeepSeek-V3 students (multi-head latent     not pruned (the heads       by hand (torch-pruning     by hand
attention: low-rank shared key/value)       share latent projections)   cannot trace MLA's splits)
==========================================  ==========================  =========================  ============

Decoder layers are removed the same way in every family (lowest block influence first), and
``layer_idx`` is renumbered so the KV cache still lines up. Heads are always cut by hand: torch-pruning
hangs on grouped-query graphs and prunes no heads when the FFN ratio is 0. ``has_kv_heads`` tells the
two attention kinds apart. MoE experts are pruned in ``compress.moe.prune_experts``, not here.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch
from torch import nn

from dsk_compress.compress.prune.importance import Importance, activation_scores, block_influence
from dsk_compress.compress.prune.importance import importance as criterion
from dsk_compress.compress.prune.targets import Shape, check_head_pruning, has_kv_heads, ratio_shape, shape_of, structure
from dsk_compress.errors import DskError, InvalidArgument


def prune_to(
    model: nn.Module,
    target: Shape,
    importance: str | Importance = "l2",
    timeout_s: float = 300,
    example_inputs=None,
    calibration=None,
    loss_for_taylor=None,
) -> dict:
    """Prune ``model`` in place to ``target`` (uniform per layer). Returns the structure after pruning
    (plus ``removed_layers`` and ``block_influence`` when layers were removed).

    Layers go first (lowest block influence on ``calibration``), then KV groups (by hand), then FFN
    channels (torch-pruning for l1/l2/taylor, by hand for activation and for multi-head latent
    attention; see the module's table). ``loss_for_taylor(model)`` gives the loss whose gradients
    Taylor importance uses (default: next-token cross-entropy on the first calibration batch).
    """
    imp = criterion(importance)
    cur = shape_of(model)
    group = cur.heads // cur.kv_heads
    if not (1 <= target.layers <= cur.layers and 1 <= target.kv_heads <= cur.kv_heads and 1 <= target.ffn <= cur.ffn):
        raise InvalidArgument(
            f"target {target.as_dict()} is not reachable by pruning {cur.as_dict()}",
            "target",
            hint="targets must be smaller and leave at least one of each",
        )
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
    acts = activation_scores(model, batches) if imp.needs_activations and (target.kv_heads < cur.kv_heads or target.ffn < cur.ffn) else None
    if target.kv_heads < cur.kv_heads:
        check_head_pruning(model.config, 1 - target.kv_heads / cur.kv_heads)
        _prune_heads(model, target.kv_heads, imp, acts, loss)
    if target.ffn < cur.ffn:
        _prune_ffn(model, target.ffn, imp, acts, loss, example, timeout_s)
    _rewrite_config(model)
    return {**structure(model), **info}


def prune_step(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ffn_ratio: float,
    head_ratio: float,
    importance: str | Importance = "l2",
    round_to: int = 8,
    timeout_s: float = 300,
    loss_for_taylor=None,
    layers_removed: int = 0,
    calibration=None,
) -> dict:
    """Remove ``ffn_ratio`` of each layer's FFN channels, ``head_ratio`` of its KV groups (with their
    query heads) and ``layers_removed`` whole decoder layers.

    Ratios are relative to the model's current size. Returns the structure after pruning.
    """
    target = ratio_shape(model.config, ffn_ratio, head_ratio, layers_removed, round_to)
    return prune_to(model, target, importance, timeout_s, example_inputs, calibration, loss_for_taylor)


def _gradients(model: nn.Module, imp: Importance, loss) -> None:
    """Fill the weights' gradients for a criterion that reads them (Taylor); nothing for the others."""
    if imp.needs_gradients:
        model.zero_grad()
        loss(model).backward()


def _prune_heads(model: nn.Module, kv_heads: int, imp: Importance, acts, loss) -> None:
    """Every layer to ``kv_heads`` KV groups, by hand (per-head q/k/v families; MLA was refused by ``check_head_pruning``)."""
    _gradients(model, imp, loss)
    for i, layer in enumerate(model.model.layers):
        scores = imp.kv_groups(layer.self_attn, acts["heads"][i] if acts else None)
        prune_kv_groups(layer.self_attn, _top(scores, kv_heads).tolist())
    model.zero_grad(set_to_none=True)


def _prune_ffn(model: nn.Module, keep: int, imp: Importance, acts, loss, example: torch.Tensor, timeout_s: float) -> None:
    """Every layer to ``keep`` FFN channels, the way the criterion and the family's attention allow: torch-pruning's graph
    for a criterion with a torch-pruning group importance (l1, l2, taylor) on Llama, Mistral, Qwen2 and Qwen3; by hand
    otherwise (measured activations, your own criterion) and for multi-head latent attention (DeepSeek: torch-pruning
    cannot trace MLA's splits)."""
    group_importance = imp.torch_pruning() if has_kv_heads(model.model.layers[0].self_attn) else None
    if group_importance is not None:
        _tp_prune_ffn(model, example, keep, imp, group_importance, timeout_s, loss)
        return
    _gradients(model, imp, loss)
    for i, layer in enumerate(model.model.layers):
        prune_ffn_channels(layer.mlp, _top(imp.ffn_channels(layer.mlp, acts["ffn"][i] if acts else None), keep).tolist())
    model.zero_grad(set_to_none=True)


def _batches(calibration, example_inputs) -> list[torch.Tensor]:
    if calibration is not None:
        out = [torch.as_tensor(b) for b in calibration]
        if out:
            return out
    if example_inputs is None:
        raise ValueError("calibration batches or example inputs are needed")
    return [torch.as_tensor(example_inputs)]


def _lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order (ties keep the lower index)."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return order.sort().values


def _rewrite_config(model: nn.Module) -> None:
    """Write the pruned widths into the config and the attention modules, so the model saves, reloads and exports
    like any other of its family (multi-head latent attention keeps its own head sizes in the config)."""
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
# by hand: slicing Linear rows and columns


def remove_layers(model: nn.Module, drop) -> list[int]:
    """Delete decoder layers ``drop`` (indices) and fix what refers to layer positions: each attention
    module's ``layer_idx`` (the KV cache slot), ``num_hidden_layers`` and ``layer_types``."""
    n = len(model.model.layers)
    drop = sorted(set(int(i) for i in drop))
    if any(i < 0 or i >= n for i in drop):
        raise ValueError(f"layer indices {drop} out of range for {n} layers")
    if len(drop) >= n:
        raise InvalidArgument(f"drop: removing {len(drop)} layers leaves none (the model has {n})", "drop", hint="remove fewer layers")
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


def _keep_out(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach().index_select(0, idx).clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach().index_select(0, idx).clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(idx)


def _keep_in(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach().index_select(1, idx).clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = len(idx)


# ---------------------------------------------------------------------------------------------
# torch-pruning (FFN channels of the per-head-attention families)


class PruneTimeout(DskError):
    """A pruning step ran past its ``timeout_s`` (torch-pruning hangs on some grouped-query graphs)."""


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


def _tp_prune_ffn(
    model: nn.Module, example_inputs: torch.Tensor, keep: int, imp: Importance, group_importance, timeout_s: float, loss
) -> None:
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
            importance=group_importance,
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=None,
            unwrapped_parameters=unwrapped,
        )
        _gradients(model, imp, loss)
        pruner.step()
    model.zero_grad(set_to_none=True)
