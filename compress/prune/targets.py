"""Targets and schedules: what a pruning step aims for, and how much it costs.

- ``Shape``: uniform per-layer widths (layers, KV groups, query heads, FFN channels); ``structure`` /
  ``shape_of`` read them off a model, ``ratio_shape`` / ``uniform_shape`` / ``interpolate`` compute
  the widths that ratios and progressive schedules lead to (``ffn_keep`` / ``kv_keep`` round them).
- Checks that raise an InvalidArgument naming the ratio at fault: ``check_prunable``, ``check_head_pruning``, ``layers_to_remove``.
- Parameter and MAC targets: ``solve_target`` finds one common ratio over the chosen structures;
  candidates are built from the config and counted (``measure_cost``, MACs with
  ``torch.utils.flop_counter`` in ``count_macs``).
- Latency targets: ``measure_latency`` exports a candidate to ONNX and times it on this host; the
  prune stage steps until the budget is met.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dsk_compress.errors import ExportError, InvalidArgument, ModelSourceError
from dsk_compress.models.common import count_params, eval_mode

STRUCTURES = ("ffn", "heads", "layers")


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
    return Shape(
        layers=cfg.num_hidden_layers, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, heads=heads, ffn=cfg.intermediate_size
    )


def ffn_keep(ffn: int, ratio: float, round_to: int) -> int:
    """FFN channels left after removing ``ratio`` of ``ffn``, rounded down to a multiple of ``round_to``
    (torch-pruning's rule); ``ratio`` 0 keeps the width as it is."""
    if ratio <= 0:
        return ffn
    n = int(ffn * (1 - ratio) + 1e-9)
    return min(ffn, n - n % round_to)


def heads_allowed(cfg, heads: int) -> bool:
    """Whether the installed transformers builds a model of ``cfg``'s family with ``heads`` query heads (transformers 5
    validates configs when they are constructed: a Llama's hidden_size must be a multiple of num_attention_heads even
    with an explicit head_dim; transformers 4 accepts any count)."""
    check = getattr(cfg, "validate_architecture", None)
    if cfg is None or check is None:
        return True
    c = copy.deepcopy(cfg)
    c.num_attention_heads = heads
    try:
        c.validate_architecture()
    except ValueError:
        return False
    return True


def allowed_kv(cfg, kv: int, group: int, floor: int = 1) -> int:
    """The largest KV-group count in ``[floor, kv]`` whose query heads (``kv * group``) ``cfg``'s family accepts."""
    while kv > floor and not heads_allowed(cfg, kv * group):
        kv -= 1
    return kv


def kv_keep(kv_heads: int, ratio: float) -> int:
    """KV groups left after removing ``ratio`` of them (the count removed is rounded up)."""
    return kv_heads - math.ceil(kv_heads * ratio - 1e-9) if ratio > 0 else kv_heads


def layers_to_remove(num_layers: int, layers_removed: int = 0, depth_ratio: float = 0.0) -> int:
    """Decoder layers to remove for ``layers_removed`` or ``depth_ratio`` (rounded down); checked."""
    if layers_removed and depth_ratio:
        raise InvalidArgument("layers_removed and depth_ratio are both given", "layers_removed", hint="keep one of them")
    if depth_ratio:
        n = int(num_layers * depth_ratio + 1e-9)
        if n < 1:
            raise InvalidArgument(
                f"depth_ratio {depth_ratio} removes no layer of the model's {num_layers}",
                "depth_ratio",
                hint=f"use depth_ratio >= {1 / num_layers:.3g} or layers_removed: 1",
            )
        if n >= num_layers:
            raise InvalidArgument(
                f"depth_ratio {depth_ratio} removes every decoder layer (the model has {num_layers})",
                "depth_ratio",
                hint="lower depth_ratio",
            )
        return n
    if layers_removed >= num_layers:
        raise InvalidArgument(
            f"layers_removed {layers_removed} removes every decoder layer (the model has {num_layers})",
            "layers_removed",
            hint=f"remove at most {num_layers - 1}",
        )
    return layers_removed


def check_head_pruning(cfg, head_ratio: float) -> None:
    """Multi-head latent attention (DeepSeek) shares low-rank key/value projections across heads: no head pruning."""
    if head_ratio > 0 and getattr(cfg, "kv_lora_rank", None):
        raise InvalidArgument(
            f"head_ratio {head_ratio}: the model ({cfg.model_type}) has multi-head latent attention, whose heads "
            "share low-rank key/value projections and are not pruned",
            "head_ratio",
            hint="set head_ratio: 0 and prune FFN channels or layers",
        )


def check_prunable(cfg, ffn_ratio: float, head_ratio: float, round_to: int, layers_removed: int = 0) -> None:
    """Raise an InvalidArgument naming the ratio that cannot be applied to a model with this config."""
    s = _config_shape(cfg)
    check_head_pruning(cfg, head_ratio)
    if s.heads % s.kv_heads:
        raise ModelSourceError(
            f"the model's num_attention_heads {s.heads} is not a multiple of num_key_value_heads {s.kv_heads}",
            hint="a Llama-family config is needed",
        )
    if head_ratio > 0 and kv_keep(s.kv_heads, head_ratio) < 1:
        what = f"{s.heads} heads" if s.kv_heads == s.heads else f"{s.kv_heads} KV groups of {s.heads // s.kv_heads} query heads"
        raise InvalidArgument(
            f"head_ratio {head_ratio} leaves no attention heads (the model has {what}; heads go in whole KV groups)",
            "head_ratio",
            hint="lower head_ratio",
        )
    if head_ratio > 0:
        group = s.heads // s.kv_heads
        left = kv_keep(s.kv_heads, head_ratio) * group
        if not heads_allowed(cfg, left):
            import transformers

            ok = [kv * group for kv in range(1, s.kv_heads + 1) if heads_allowed(cfg, kv * group)]
            raise InvalidArgument(
                f"head_ratio {head_ratio} leaves {left} attention heads, which transformers {transformers.__version__} "
                f"refuses for hidden_size {cfg.hidden_size} (it must be a multiple of num_attention_heads)",
                "head_ratio",
                hint=f"choose a head_ratio that leaves one of {ok} heads (of {s.heads})",
            )
    if ffn_ratio > 0 and s.ffn * (1 - ffn_ratio) < round_to:
        raise InvalidArgument(
            f"ffn_ratio {ffn_ratio} leaves fewer than round_to={round_to} FFN channels", "ffn_ratio", hint="lower ffn_ratio or round_to"
        )
    layers_to_remove(s.layers, layers_removed)


def ratio_shape(cfg, ffn_ratio: float, head_ratio: float, layers_removed: int, round_to: int) -> Shape:
    """The structure the ratios lead to (after ``check_prunable``)."""
    check_prunable(cfg, ffn_ratio, head_ratio, round_to, layers_removed)
    s = _config_shape(cfg)
    kv = kv_keep(s.kv_heads, head_ratio)
    return Shape(
        layers=s.layers - layers_removed, kv_heads=kv, heads=kv * (s.heads // s.kv_heads), ffn=ffn_keep(s.ffn, ffn_ratio, round_to)
    )


def uniform_shape(start: Shape, ratio: float, structures, round_to: int, cfg=None) -> Shape:
    """``start`` with ``ratio`` of each named structure (ffn, heads, layers) removed, never below one
    layer, one KV group or ``round_to`` channels; with ``cfg``, head counts its family refuses round down."""
    ffn, kv, layers = start.ffn, start.kv_heads, start.layers
    if "ffn" in structures and start.ffn > round_to:
        ffn = max(round_to, ffn_keep(start.ffn, ratio, round_to))
    if "heads" in structures:
        kv = allowed_kv(cfg, max(1, kv_keep(start.kv_heads, ratio)), start.heads // start.kv_heads)
    if "layers" in structures:
        layers = max(1, start.layers - int(start.layers * ratio + 1e-9))
    return Shape(layers=layers, kv_heads=kv, heads=kv * (start.heads // start.kv_heads), ffn=ffn)


def interpolate(start: Shape, final: Shape, frac: float, round_to: int, cfg=None) -> Shape:
    """Step ``frac`` (0..1] of a progressive schedule from ``start`` to ``final``: widths shrink
    geometrically (``start * (final / start) ** frac``), layers linearly; ``frac`` 1 is ``final``; with
    ``cfg``, head counts its family refuses round down (not below ``final``)."""
    if frac >= 1:
        return final
    ffn = start.ffn
    if final.ffn < start.ffn:
        n = int(start.ffn * (final.ffn / start.ffn) ** frac + 1e-9)
        ffn = min(start.ffn, max(final.ffn, n - n % round_to))
    kv = min(start.kv_heads, max(final.kv_heads, round(start.kv_heads * (final.kv_heads / start.kv_heads) ** frac)))
    kv = allowed_kv(cfg, kv, start.heads // start.kv_heads, floor=final.kv_heads)
    layers = start.layers - round((start.layers - final.layers) * frac)
    return Shape(layers=layers, kv_heads=kv, heads=kv * (start.heads // start.kv_heads), ffn=ffn)


# ---------------------------------------------------------------------------------------------
# parameter and MAC targets


@torch.no_grad()
def count_macs(model: nn.Module, seq_len: int, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass (all matmuls, attention scores included), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch_size, seq_len, dtype=torch.long)
    with eval_mode(model), FlopCounterMode(display=False) as fc:
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

    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        m = AutoModelForCausalLM.from_config(shaped_config(cfg, shape), attn_implementation="eager", torch_dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()  # uninitialised memory can hold denormals, which are slow to multiply
    return count_params(m), count_macs(m, seq_len)


def solve_target(
    model: nn.Module, kind: str, fraction: float, structures, round_to: int, seq_len: int, max_ratio: float = 0.9
) -> tuple[Shape, dict]:
    """The least pruning (one common ratio over ``structures``) whose params or MACs are at most
    ``fraction`` of the model's. Raises an InvalidArgument about ``kind`` (``params`` or ``macs``) when even
    ``max_ratio`` does not get there."""
    if kind not in ("params", "macs"):
        raise ValueError(f"unknown target kind {kind!r}")
    bad = [s for s in structures if s not in STRUCTURES]
    if bad or not structures:
        raise InvalidArgument(f"structures {list(structures)} is not a non-empty list of {', '.join(STRUCTURES)}", "structures")
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
    smallest = uniform_shape(start, max_ratio, structures, round_to, cfg)
    if cost(smallest) > budget:
        raise InvalidArgument(
            f"{kind} {fraction} is unreachable by pruning {', '.join(structures)} up to max_ratio {max_ratio}: "
            f"the smallest candidate keeps {cost(smallest) / base:.3f} of the {kind}",
            kind,
            hint=f"raise {kind}, raise max_ratio or add structures (ffn, heads, layers)",
        )
    lo, hi = 0.0, max_ratio
    for _ in range(40):  # the cost only falls as the ratio grows; find the first step that fits
        mid = (lo + hi) / 2
        if cost(uniform_shape(start, mid, structures, round_to, cfg)) <= budget:
            hi = mid
        else:
            lo = mid
    shape = uniform_shape(start, hi, structures, round_to, cfg)
    info = {
        "kind": kind,
        "fraction": fraction,
        "structures": list(structures),
        "ratio": round(hi, 6),
        "solved": shape.as_dict(),
        f"{kind}_before": base,
        f"{kind}_solved": cost(shape),
        "achieved_fraction": round(cost(shape) / base, 6),
        "candidates_counted": len(costs),
        "seq_len": seq_len,
    }
    return shape, info


# ---------------------------------------------------------------------------------------------
# latency on this host


def measure_latency(
    model: nn.Module, example, workdir: str | Path, threads: int | None = None, runs: int = 20, warmup: int = 3, parity_atol: float = 1e-3
) -> dict:
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
    return {
        "p50_ms": res.p50,
        "p90_ms": res.p90,
        "mean_ms": res.mean,
        "runs": res.runs,
        "threads": threads,
        "seq_len": int(x.shape[1]),
        "parity_max_abs_diff": diff,
        "runtime": f"onnxruntime-{res.device}",
    }
