"""Build a dense student from a (MoE or dense) teacher: chosen layers, FFN initialised from experts.

Works for every family in :data:`dsk_compress.compress.moe.FAMILIES`. Where transformers has the
teacher's dense counterpart with the same attention numerics, the student is that model, so attention,
norms, embeddings and the LM head copy weight for weight: Mixtral -> Llama (Mistral with a sliding
window), Qwen2-MoE -> Qwen2 with its q/k/v bias, Qwen3-MoE -> Qwen3 with q_norm/k_norm, GraniteMoE ->
Granite with its multipliers, DeepSeek-V2/V3 and GLM4-MoE -> the same family with every layer dense
(MLA / partial-rotary attention kept as it is); a dense teacher -> its own family. OLMoE, PhiMoE and
gpt-oss have no dense counterpart: their student is a Llama that takes every tensor whose name and
shape fit and drops the rest (``Family.approx`` says what; ``info["dropped"]`` lists it), and
distillation has to recover the difference.

Experts are read through :class:`dsk_compress.compress.moe.Experts` (either storage layout). Shared
experts are folded into the merged FFN by one rule: the shared expert enters with its mean gate on the
calibration data (1.0 when ungated, the mean sigmoid of Qwen2-MoE's ``shared_expert_gate``), each routed
expert with its routing frequency times the layer's mean routed mass.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from dsk_compress.compress.moe import Experts, dense_mlp_weights, family, ffn_of, moe_blocks, router_stats
from dsk_compress.errors import InvalidArgument, ModelSourceError


def select_layers(n_layers: int, layers: list[int] | None, keep_every: int | None) -> list[int]:
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise InvalidArgument(f"layers: {bad} out of range", "layers", hint=f"the teacher has layers 0..{n_layers - 1}")
        dup = sorted({i for i in layers if layers.count(i) > 1})
        if dup or not layers:
            raise InvalidArgument(
                f"layers: give distinct, non-empty layer indices (repeated: {dup})",
                "layers",
                hint="list each teacher layer to keep once, e.g. [0, 2, 5]",
            )
        return sorted(layers)
    k = keep_every or 2
    keep = list(range(0, n_layers, k))
    if keep[-1] != n_layers - 1:
        keep.append(n_layers - 1)
    return keep


def _check_heads(t) -> None:
    heads, kv = t.num_attention_heads, getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    if heads % kv:
        raise ModelSourceError(
            f"teacher config: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}",
            hint="the student copies the teacher's attention; fix the teacher's config.json",
        )
    if not getattr(t, "head_dim", None) and t.hidden_size % heads:
        raise ModelSourceError(
            f"teacher config: hidden_size {t.hidden_size} is not divisible by num_attention_heads {heads}",
            hint="set head_dim in the teacher's config.json or use a teacher whose heads divide its width",
        )


def _layer_types(t, keep: list[int]) -> list[str]:
    """Each kept layer's attention type (sliding window or full) as the teacher applies it."""
    if getattr(t, "layer_types", None):
        return [t.layer_types[i] for i in keep]
    return ["sliding_attention" if getattr(t, "sliding_window", None) else "full_attention"] * len(keep)


def student_config(teacher_cfg, keep: list[int], intermediate_size: int | None):
    """The dense student's config: the teacher's dense counterpart with ``len(keep)`` layers of FFN width ``intermediate_size``."""
    from transformers import CONFIG_MAPPING

    t = teacher_cfg
    fam = family(t)
    kind = fam.student
    _check_heads(t)
    if kind == "llama" and fam.approx is None and getattr(t, "sliding_window", None):
        kind = "mistral"  # a sliding-window Mixtral: Mistral keeps the window, Llama would not
    cls = CONFIG_MAPPING[kind]
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    kw = {k: getattr(t, k) for k in params if hasattr(t, k)}  # only the student class's own fields, no MoE leftovers
    if not getattr(t, "head_dim", None):
        kw.pop("head_dim", None)
    kw.update(num_hidden_layers=len(keep), intermediate_size=intermediate_size or default_width(t))
    if "layer_types" in params:
        kw["layer_types"] = _layer_types(t, keep)
    if fam.student_all_dense:
        kw["first_k_dense_replace"] = len(keep)  # every student layer dense; MLA attention kept as it is
    if fam.approx is not None:  # a Llama student: biases where the teacher has them
        kw["attention_bias"] = bool(getattr(t, "attention_bias", False))
        kw["mlp_bias"] = fam.fused_layout == "gpt_oss"
        kw["hidden_act"] = "silu"
    cfg = cls(**kw)
    if "head_dim" not in params and not fam.student_all_dense and getattr(t, "head_dim", None):
        cfg.head_dim = t.head_dim  # Qwen2 reads head_dim when the config has it
    return cfg


def default_width(t) -> int:
    """One routed expert's width for an MoE teacher, the FFN width for a dense one."""
    return getattr(t, "moe_intermediate_size", None) or t.intermediate_size


def _copy_module(dst: nn.Module, src: nn.Module, approx: bool = False, where: str = "", dropped: list | None = None) -> None:
    """Copy ``src``'s weights into ``dst`` (same parameter names); biases the teacher lacks are zeroed.

    ``approx`` (a student of another family): tensors whose name or shape do not fit are dropped and listed in ``dropped``.
    """
    state = src.state_dict()
    if approx:
        own = dst.state_dict()
        fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        dropped.extend(f"{where}.{k}" for k in state if k not in fit)
        state = fit
    try:
        missing, unexpected = dst.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape the student config derived differently from the teacher's weights
        raise ModelSourceError(
            f"cannot copy the teacher's {type(src).__name__}: {str(e).splitlines()[-1].strip()[:200]}",
            hint="check head_dim / num_key_value_heads in the teacher's config.json",
        ) from None
    if approx:
        missing = [k for k in missing if k.endswith("bias")]
    if unexpected or any(not k.endswith("bias") for k in missing):
        raise ModelSourceError(f"cannot copy {type(src).__name__} into {type(dst).__name__} (missing {missing}, unexpected {unexpected})")
    for k in missing:
        dst.get_parameter(k).data.zero_()


def _channels(t_layer: nn.Module, fam, name: str, block, stats, ffn_init: str, inter: int):
    """(gate [C, H], up [C, H], down [H, C], gate bias, up bias, down bias) of the wide FFN this layer's student
    channels are taken from (biases None where no expert has one).

    ``merge``: every routed expert side by side, each down projection scaled by its routing frequency
    times the layer's mean routed mass (the MoE with its gates replaced by their expected values),
    plus the shared expert scaled by its mean gate. ``top``: the shared expert plus the most-used
    routed experts (enough to fill ``inter``), each weighted by its share of their routing.
    """
    if block is None:  # a dense teacher layer (also DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
        return (*dense_mlp_weights(ffn_of(fam, t_layer)[1]), None, None, None)
    s = stats[name]
    ex = Experts(block, fam)
    order = list(range(len(ex)))
    if ffn_init == "top":
        width = ex.expert(0).gate.shape[0]
        need = inter - (dense_mlp_weights(getattr(block, fam.shared))[0].shape[0] if fam.shared else 0)
        order = s.freq.argsort(descending=True).tolist()[: max(1, -(-need // width))]
    share = s.freq[order] / s.freq[order].sum()
    parts = [(ex.silu_form(e), float(w) * s.mass) for e, w in zip(order, share)]
    if fam.shared:
        # Qwen2-MoE's shared expert has an input-dependent sigmoid gate: it enters with its mean value on the
        # calibration data (s.shared_gate), the one scalar a dense FFN can carry; DeepSeek's is ungated (1.0)
        from dsk_compress.compress.moe import ExpertFFN

        parts.insert(0, (ExpertFFN(*dense_mlp_weights(getattr(block, fam.shared))), s.shared_gate))
    biased = any(p.gate_bias is not None for p, _ in parts)

    def bias(p, attr, n):
        b = getattr(p, attr)
        return b if b is not None else p.gate.new_zeros(n)

    gate = torch.cat([p.gate for p, _ in parts])
    up = torch.cat([p.up for p, _ in parts])
    down = torch.cat([w * p.down for p, w in parts], dim=1)
    if not biased:
        return gate, up, down, None, None, None
    gb = torch.cat([bias(p, "gate_bias", p.gate.shape[0]) for p, _ in parts])
    ub = torch.cat([bias(p, "up_bias", p.gate.shape[0]) for p, _ in parts])
    db = sum(w * bias(p, "down_bias", p.down.shape[0]) for p, w in parts)  # every expert's output bias, weighted like its output
    return gate, up, down, gb, ub, db


def _fill_ffn(s_mlp: nn.Module, ws, inter: int, ti: int) -> None:
    if ws[0].shape[0] < inter:
        raise InvalidArgument(
            f"intermediate_size {inter} is wider than teacher layer {ti}'s FFN ({ws[0].shape[0]} channels)",
            "intermediate_size",
            hint=f"use at most {ws[0].shape[0]} or ffn_init: random",
        )
    # keep the channels with the largest down-projection norm when the student is narrower
    idx = ws[2].norm(dim=0).argsort(descending=True)[:inter].sort().values
    s_mlp.gate_proj.weight.copy_(ws[0][idx])
    s_mlp.up_proj.weight.copy_(ws[1][idx])
    s_mlp.down_proj.weight.copy_(ws[2][:, idx])
    for proj, b in (("gate_proj", ws[3]), ("up_proj", ws[4]), ("down_proj", ws[5])):
        dst = getattr(s_mlp, proj).bias
        if dst is not None:
            dst.zero_() if b is None else dst.copy_(b if proj == "down_proj" else b[idx])


def build_student(
    teacher: nn.Module,
    layers: list[int] | None = None,
    keep_every: int | None = None,
    intermediate_size: int | None = None,
    ffn_init: str = "merge",
    calibration=None,
    seed: int = 0,
):
    """Cut a dense student from ``teacher`` (any family in ``FAMILIES``).

    Attention, norms, embeddings and the LM head are copied from the kept teacher layers. Each dense
    FFN is initialised from that layer's experts: ``merge`` places all routed experts (and the shared
    expert) side by side with each down projection scaled by its expected gate measured on
    ``calibration`` batches and keeps the ``intermediate_size`` channels with the largest
    down-projection norm; ``top`` takes the most-used routed expert(s) with the shared expert;
    ``random`` keeps the fresh initialisation. A dense teacher layer's FFN is copied (sliced when the
    student is narrower).

    Returns:
        (student, info) where info records the kept layers and the router statistics used.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if ffn_init not in ("merge", "top", "random"):
        raise InvalidArgument(f"ffn_init {ffn_init!r} is not one of merge, top, random", "ffn_init", hint="use ffn_init: merge")
    if intermediate_size is not None and intermediate_size <= 0:
        raise InvalidArgument(
            f"intermediate_size {intermediate_size} must be positive", "intermediate_size", hint="give a width > 0 or leave it out"
        )
    tcfg = teacher.config
    fam = family(tcfg)
    keep = select_layers(tcfg.num_hidden_layers, layers, keep_every)
    cfg = student_config(tcfg, keep, intermediate_size)
    torch.manual_seed(seed)
    student = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)](cfg)
    student.config._attn_implementation = "eager"
    blocks = dict(moe_blocks(teacher))
    stats = {}
    if blocks and ffn_init != "random":
        if calibration is None:
            raise ValueError("expert-based FFN init needs calibration batches")
        stats = router_stats(teacher, calibration)
    t_model, s_model = teacher.model, student.model
    approx, dropped = fam.approx is not None, []
    with torch.no_grad():
        for dst, src, where in (
            (s_model.embed_tokens, t_model.embed_tokens, "model.embed_tokens"),
            (s_model.norm, t_model.norm, "model.norm"),
            (student.lm_head, teacher.lm_head, "lm_head"),
        ):
            _copy_module(dst, src, approx, where, dropped)
        for si, ti in enumerate(keep):
            sl, tl = s_model.layers[si], t_model.layers[ti]
            for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
                _copy_module(getattr(sl, part), getattr(tl, part), approx, f"model.layers.{ti}.{part}", dropped)
            if ffn_init != "random":
                name = f"model.layers.{ti}.{ffn_of(fam, tl)[0]}"
                ws = _channels(tl, fam, name, blocks.get(name), stats, ffn_init, cfg.intermediate_size)
                _fill_ffn(sl.mlp, ws, cfg.intermediate_size, ti)
    student.eval()
    info = {
        "family": tcfg.model_type,
        "student": cfg.model_type,
        "layers": keep,
        "ffn_init": ffn_init,
        "router_frequencies": {k: [round(float(x), 4) for x in v.freq] for k, v in stats.items()},
        "routed_mass": {k: round(v.mass, 4) for k, v in stats.items()},
        "shared_gate": {k: round(v.shared_gate, 4) for k, v in stats.items() if v.shared_gate is not None},
    }
    if approx:
        info["approximation"] = fam.approx
        info["dropped"] = sorted(set(dropped))
    return student, info
