"""Importance criteria: which channels, KV groups and decoder layers matter least.

Each criterion is an object (as Torch-Pruning's importances are), looked up by name with
:func:`importance`:

- ``Magnitude(p)`` (``l1``, ``l2``) sums |w|**p, ``Taylor`` (``taylor``) sums |w * grad| over everything
  an FFN channel or KV group owns; ``torch_pruning()`` gives torch-pruning's group importance for the same
  criterion (FFN channels of per-head-attention families, CNN channels).
- ``Activation`` (``activation``) ranks by measured activations on calibration data
  (:func:`activation_scores`: mean |activation| per FFN channel, mean output norm per attention head).

Decoder layers are ranked by ``block_influence`` (ShortGPT's ``1 - cos(input, output)``) whatever the criterion.
A new criterion is one subclass and one entry in :data:`IMPORTANCES`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsk_compress.errors import InvalidArgument
from dsk_compress.models.common import eval_mode

# ---------------------------------------------------------------------------------------------
# criteria


def _group_rows(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a per-channel vector into ``groups`` consecutive equal blocks."""
    return t.reshape(groups, -1).sum(1)


class Importance:
    """A pruning criterion. ``needs_gradients``: the caller fills the weights' ``.grad`` with a loss first;
    ``needs_activations``: the scores come from :func:`activation_scores` on calibration data."""

    name = ""
    needs_gradients = False
    needs_activations = False

    def weight(self, p: torch.Tensor) -> torch.Tensor:
        """Elementwise importance of a weight tensor."""
        raise InvalidArgument(f"importance {self.name} does not score weights", "importance", hint="use l1, l2 or taylor")

    def ffn_channels(self, mlp: nn.Module, measured: torch.Tensor | None = None) -> torch.Tensor:
        """Importance of each FFN channel: its gate and up rows and its down_proj column."""
        f = self.weight
        return f(mlp.gate_proj.weight).double().sum(1) + f(mlp.up_proj.weight).double().sum(1) + f(mlp.down_proj.weight).double().sum(0)

    def kv_groups(self, attn: nn.Module, measured_heads: torch.Tensor | None = None) -> torch.Tensor:
        """Importance of each KV group of one attention module: its q, k, v rows (and biases) and o_proj columns."""
        kv = attn.k_proj.out_features // attn.head_dim
        score = torch.zeros(kv, dtype=torch.float64)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            score += _group_rows(self.weight(lin.weight).double().sum(1), kv)
            if lin.bias is not None:
                score += _group_rows(self.weight(lin.bias).double(), kv)
        return score + _group_rows(self.weight(attn.o_proj.weight).double().sum(0), kv)

    def torch_pruning(self):
        """torch-pruning's group importance for this criterion, or None: the channels are scored by hand
        (:meth:`ffn_channels`), which every decoder family supports."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Magnitude(Importance):
    """|w| (``p=1``, ``l1``) or w**2 (``p=2``, ``l2``)."""

    def __init__(self, p: int) -> None:
        self.p = p
        self.name = f"l{p}"

    def weight(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach().abs() if self.p == 1 else p.detach().abs() ** self.p

    def torch_pruning(self):
        import torch_pruning as tp

        return tp.importance.GroupMagnitudeImportance(p=self.p, group_reduction="mean")


class Taylor(Importance):
    """First-order Taylor: |w * grad| (needs the gradients of a loss)."""

    name = "taylor"
    needs_gradients = True

    def weight(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            raise InvalidArgument("importance taylor needs gradients; none were computed", "importance", hint="use l2 or give a loss")
        return (p.detach() * p.grad.detach()).abs()

    def torch_pruning(self):
        import torch_pruning as tp

        return tp.importance.GroupTaylorImportance()


class Activation(Importance):
    """Mean |activation| per FFN channel, mean output norm per attention head, measured on calibration data."""

    name = "activation"
    needs_activations = True

    def ffn_channels(self, mlp: nn.Module, measured: torch.Tensor | None = None) -> torch.Tensor:
        if measured is None:
            raise ValueError("activation importance needs measured FFN activations")
        return measured.double()

    def kv_groups(self, attn: nn.Module, measured_heads: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of the group's query heads' mean output norms."""
        if measured_heads is None:
            raise ValueError("activation importance needs measured head outputs")
        return _group_rows(measured_heads.double(), attn.k_proj.out_features // attn.head_dim)


IMPORTANCES: dict[str, Importance] = {c.name: c for c in (Magnitude(1), Magnitude(2), Taylor(), Activation())}


def importance(criterion: str | Importance) -> Importance:
    """The criterion object for a name in :data:`IMPORTANCES` (an :class:`Importance` passes through)."""
    if isinstance(criterion, Importance):
        return criterion
    if criterion not in IMPORTANCES:
        raise InvalidArgument(f"importance {criterion!r} is unknown", "importance", hint=f"valid: {', '.join(IMPORTANCES)}")
    return IMPORTANCES[criterion]


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
