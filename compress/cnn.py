"""Your own torch models (CNNs and other ``model(x) -> logits`` modules): channel pruning, BatchNorm folding,
classifier KD loss, MAC counting, and safetensors save / reload of pruned or quantized models.

Pruning uses torch-pruning's dependency graph, so every layer coupled to a pruned conv's output
channels (its BatchNorm, the next conv's input channels, a Linear behind a flatten, residual
partners) shrinks with it. A pruned model reloads without pickle: the factory builds the original
architecture, each layer is resized to the shapes in the saved safetensors, then the weights load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsk_compress.errors import InvalidArgument, ModelSourceError

if TYPE_CHECKING:
    from dsk_compress.compress.prune.importance import Importance


# ---------------------------------------------------------------------------------------------
# structure


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d (fake-quant convs included), by module name."""
    from dsk_compress.compress.qat import QuantConv2d

    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, QuantConv2d))}


def channel_keep(channels: int, ratio: float, round_to: int) -> int:
    """Channels left after removing ``ratio`` of ``channels``, rounded down to a multiple of ``round_to``
    (at least ``round_to``; a layer with no more than ``round_to`` channels is not pruned)."""
    if channels <= round_to:
        return channels
    return max(round_to, int(channels * (1 - ratio) // round_to) * round_to)


def target_widths(widths: dict[str, int], ratio: float, round_to: int) -> dict[str, int]:
    return {n: channel_keep(c, ratio, round_to) for n, c in widths.items()}


def interpolate_widths(start: dict[str, int], final: dict[str, int], frac: float, round_to: int) -> dict[str, int]:
    """Widths a fraction ``frac`` of the way from ``start`` to ``final`` (geometric), rounded to ``round_to``."""
    out = {}
    for n, s in start.items():
        f = final[n]
        if frac >= 1 or s == f:
            out[n] = f
            continue
        w = s * (f / s) ** frac
        out[n] = min(s, max(f, int(round(w / round_to)) * round_to))
    return out


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (``FlopCounterMode`` FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            model(torch.as_tensor(example))
    finally:
        model.train(was)
    return int(fc.get_total_flops()) // 2


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Leaf modules whose output is the model's output (their output channels are the task's, never pruned)."""
    outs: dict[int, nn.Module] = {}
    keep = []
    hooks = []
    for m in model.modules():
        if not list(m.children()) and list(m.parameters(recurse=False)):

            def hook(mod, _inp, o):
                if torch.is_tensor(o):
                    outs[id(o)] = mod
                    keep.append(o)

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            y = model(torch.as_tensor(example))
    finally:
        for h in hooks:
            h.remove()
    ys = y if isinstance(y, (tuple, list)) else [y]
    return [outs[id(t)] for t in ys if torch.is_tensor(t) and id(t) in outs]


# ---------------------------------------------------------------------------------------------
# pruning


def prune_channels(
    model: nn.Module,
    widths: dict[str, int],
    example: torch.Tensor,
    importance: str | Importance = "l2",
    loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> dict[str, int]:
    """Prune the output channels of each Conv2d named in ``widths`` down to that many (in place).

    Channels are ranked by ``importance`` over the whole dependency group (the conv, its BatchNorm,
    the consumers' input channels). ``taylor`` needs ``loss(model)``, whose gradients it reads.
    Layers whose output is the model's output are never pruned. Returns the widths after pruning.
    """
    import torch_pruning as tp

    from dsk_compress.compress.prune.importance import importance as criterion

    crit = criterion(importance)
    imp = crit.torch_pruning()
    if imp is None:
        raise InvalidArgument(f"importance {crit.name} has no torch-pruning group importance", "importance", hint="use l1, l2 or taylor")
    example = torch.as_tensor(example)
    ignored = output_layers(model, example)
    names = {m: n for n, m in model.named_modules()}
    was = model.training
    model.eval()
    if crit.needs_gradients:
        if loss is None:
            raise InvalidArgument("importance taylor needs a loss (task data)", "importance", hint="use l1 or l2")
        model.zero_grad()
        loss(model).backward()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        for group in list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d])):
            root = group[0].dep.target.module
            name = names.get(root)
            if name not in widths or root.out_channels <= widths[name]:
                continue
            scores = imp(group)
            n_remove = root.out_channels - widths[name]
            idxs = torch.argsort(scores)[:n_remove].tolist()
            g = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=sorted(idxs))
            if not dg.check_pruning_group(g):
                raise InvalidArgument(
                    f"widths: torch-pruning refuses to remove {n_remove} channels of {name}", "widths", hint="prune fewer channels"
                )
            g.prune()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return {n: w for n, w in conv_widths(model).items() if n in widths}


# ---------------------------------------------------------------------------------------------
# BatchNorm folding


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor, atol: float = 1e-5) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d that directly follows a Conv2d into that conv (eval statistics), in place.

    A BatchNorm whose input is exactly a conv's output (found by running ``example`` with hooks)
    is folded: ``w' = w * g / sqrt(v + eps)``, ``b' = (b - mean) * g / sqrt(v + eps) + beta``, and the
    BatchNorm becomes ``nn.Identity``. The model is put in eval mode; its outputs on ``example``
    before and after must agree within ``atol`` (relative to the largest output), or nothing is changed.
    Returns the ``(conv, batchnorm)`` name pairs that were folded.
    """
    model.eval()
    example = torch.as_tensor(example)
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d:
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: produced.__setitem__(id(o), (name, o))))
        elif type(m) is nn.BatchNorm2d:

            def pre(mod, args, name=name):
                hit = produced.get(id(args[0]))
                if hit is not None and hit[1] is args[0]:
                    pairs.append((hit[0], name))

            hooks.append(m.register_forward_pre_hook(pre))
    try:
        ref = model(example)
    finally:
        for h in hooks:
            h.remove()
    convs = [c for c, _ in pairs]
    pairs = [(c, b) for c, b in pairs if convs.count(c) == 1]  # a conv feeding two BatchNorms stays unfolded
    if not pairs:
        return []
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    for cname, bname in pairs:
        conv, bn = modules[cname], modules[bname]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
        _set_module(model, bname, nn.Identity())
    got = model(example)
    err = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1.0)
    if err > atol:  # a conv output also used elsewhere (e.g. before its BatchNorm): undo
        for cname, bname in pairs:
            _set_module(model, bname, modules[bname])
            if modules[cname].bias is not None and f"{cname}.bias" not in state:
                modules[cname].bias = None
        model.load_state_dict(state)
        raise ModelSourceError(
            f"folding BatchNorm into convs changed the outputs by {err:.2e}", hint="this model's conv -> BatchNorm pattern is not foldable"
        )
    return pairs


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_folded(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> None:
    """Repeat a ``fold_batchnorm`` structurally (BatchNorm -> Identity, conv gets a bias) before loading a folded state."""
    for cname, bname in pairs:
        conv = model.get_submodule(cname)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        _set_module(model, bname, nn.Identity())


# ---------------------------------------------------------------------------------------------
# save / reload of pruned models: resize the factory's layers to the saved shapes


@torch.no_grad()
def resize_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Give every parameter and buffer of ``model`` the shape it has in ``state`` and fix the layers'
    size attributes (Conv2d channels and groups, BatchNorm/GroupNorm features, Linear features). Returns
    the names of the resized modules; load the weights with ``load_state_dict`` afterwards."""
    resized = []
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        changed = False
        for store in (m._parameters, m._buffers):
            for k, t in list(store.items()):
                s = state.get(prefix + k)
                if t is None or s is None or tuple(t.shape) == tuple(s.shape):
                    continue
                new = torch.zeros(s.shape, dtype=t.dtype, device=t.device)
                store[k] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                changed = True
        if not changed:
            continue
        resized.append(mname)
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Conv2d) or type(m).__name__ == "QuantConv2d":
            out_c, in_per_group = w.shape[:2]
            if m.groups > 1 and m.groups == m.in_channels:  # depthwise: groups follow the channels
                m.groups = out_c // max(1, m.out_channels // m.groups)
            m.out_channels, m.in_channels = out_c, in_per_group * m.groups
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            m.num_features = int(m.running_mean.shape[0]) if m.running_mean is not None else int(w.shape[0])
        elif isinstance(m, nn.GroupNorm):
            m.num_channels = int(w.shape[0])
        elif isinstance(m, nn.Linear) or type(m).__name__ == "QuantLinear":
            m.out_features, m.in_features = w.shape
    return resized


# ---------------------------------------------------------------------------------------------
# training and prediction


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``: how the torch path calls a model (the output is the task's logits)."""
    return model(x)


def make_classifier_kd_loss(teacher: nn.Module | None, temperature: float = 2.0, kd_weight: float = 0.8, hard_loss: Callable | None = None):
    """A trainer ``loss_fn`` for batches ``(x, y)``: ``kd_weight * T^2 * KL(teacher_T || student_T) + (1 - kd_weight) * hard``.

    ``hard`` is cross-entropy of the logits ``[B, C]`` against the labels ``y``, or ``hard_loss(logits, batch)``
    when the task defines ``loss``. With ``kd_weight == 0`` or no teacher only the hard loss is used.
    """

    def loss_fn(model, batch, index):
        x = batch[0]
        s = model(x).float()
        hard = hard_loss(s, batch) if hard_loss is not None else F.cross_entropy(s, batch[1])
        logs = {"ce": float(hard.detach())}
        if teacher is None or kd_weight == 0:
            return hard, logs
        with torch.no_grad():
            t = teacher(x).float()
        log_ps = F.log_softmax(s / temperature, dim=-1)
        log_pt = F.log_softmax(t / temperature, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2
        logs["kl"] = float(kl.detach())
        return kd_weight * kl + (1 - kd_weight) * hard, logs

    return loss_fn


def torch_predict(model: nn.Module):
    """A task ``predict`` function for a ``model(x) -> logits`` module (numpy in, numpy out)."""
    dev = next(model.parameters()).device

    @torch.no_grad()
    def predict(x):
        return model(torch.as_tensor(x, device=dev)).float().cpu().numpy()

    return predict
