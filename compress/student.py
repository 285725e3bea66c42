"""Build a dense student from a (MoE or dense) teacher: chosen layers, FFN initialised from experts.

Works for every family in :data:`dsk_compress.compress.moe.FAMILIES`. The student is the teacher's
dense counterpart with the same attention numerics (Mixtral -> Llama, Qwen2-MoE -> Qwen2 with its
q/k/v bias, Qwen3-MoE -> Qwen3 with q_norm/k_norm, DeepSeek-V3 -> DeepseekV3 with every layer dense
so its MLA attention copies exactly; a dense teacher -> its own family), so attention, norms,
embeddings and the LM head copy weight for weight.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from dsk_compress.compress.moe import DENSE_PROJ, expert_weights, family, moe_blocks, router_stats
from dsk_compress.errors import ModelSourceError, RecipeError

_FIELD = "student.from_teacher"


def select_layers(n_layers: int, layers: list[int] | None, keep_every: int | None) -> list[int]:
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise RecipeError(f"{_FIELD}.layers: {bad} out of range", hint=f"the teacher has layers 0..{n_layers - 1}")
        dup = sorted({i for i in layers if layers.count(i) > 1})
        if dup or not layers:
            raise RecipeError(f"{_FIELD}.layers: give distinct, non-empty layer indices (repeated: {dup})",
                              hint="list each teacher layer to keep once, e.g. [0, 2, 5]")
        return sorted(layers)
    k = keep_every or 2
    keep = list(range(0, n_layers, k))
    if keep[-1] != n_layers - 1:
        keep.append(n_layers - 1)
    return keep


def _check_heads(t) -> None:
    heads, kv = t.num_attention_heads, getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    if heads % kv:
        raise ModelSourceError(f"teacher config: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}",
                               hint="the student copies the teacher's attention; fix the teacher's config.json")
    if not getattr(t, "head_dim", None) and t.hidden_size % heads:
        raise ModelSourceError(f"teacher config: hidden_size {t.hidden_size} is not divisible by num_attention_heads {heads}",
                               hint="set head_dim in the teacher's config.json or use a teacher whose heads divide its width")


def _layer_types(t, keep: list[int]) -> list[str]:
    """Each kept layer's attention type (sliding window or full) as the teacher applies it."""
    if getattr(t, "layer_types", None):
        return [t.layer_types[i] for i in keep]
    return ["sliding_attention" if getattr(t, "sliding_window", None) else "full_attention"] * len(keep)


def student_config(teacher_cfg, keep: list[int], intermediate_size: int | None):
    """The dense student's config: the teacher's dense counterpart with ``len(keep)`` layers of FFN width ``intermediate_size``."""
    from transformers import CONFIG_MAPPING

    t = teacher_cfg
    kind = family(t).student
    _check_heads(t)
    if kind == "llama" and getattr(t, "sliding_window", None):
        kind = "mistral"  # a sliding-window Mixtral: Mistral keeps the window, Llama would not
    cls = CONFIG_MAPPING[kind]
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    kw = {k: getattr(t, k) for k in params if hasattr(t, k)}  # only the student class's own fields, no MoE leftovers
    if not getattr(t, "head_dim", None):
        kw.pop("head_dim", None)
    kw.update(num_hidden_layers=len(keep), intermediate_size=intermediate_size or default_width(t))
    if "layer_types" in params:
        kw["layer_types"] = _layer_types(t, keep)
    if kind == "deepseek_v3":
        kw["first_k_dense_replace"] = len(keep)  # every student layer dense; MLA attention kept as it is
    cfg = cls(**kw)
    if "head_dim" not in params and kind != "deepseek_v3" and getattr(t, "head_dim", None):
        cfg.head_dim = t.head_dim  # Qwen2 reads head_dim when the config has it
    return cfg


def default_width(t) -> int:
    """One routed expert's width for an MoE teacher, the FFN width for a dense one."""
    return getattr(t, "moe_intermediate_size", None) or t.intermediate_size


def _copy_module(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s weights into ``dst`` (same parameter names); biases the teacher lacks are zeroed."""
    try:
        missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    except RuntimeError as e:  # a shape the student config derived differently from the teacher's weights
        raise ModelSourceError(f"cannot copy the teacher's {type(src).__name__}: {str(e).splitlines()[-1].strip()[:200]}",
                               hint="check head_dim / num_key_value_heads in the teacher's config.json") from None
    if unexpected or any(not k.endswith("bias") for k in missing):
        raise ModelSourceError(f"cannot copy {type(src).__name__} into {type(dst).__name__} (missing {missing}, unexpected {unexpected})")
    for k in missing:
        dst.get_parameter(k).data.zero_()


def _channels(t_layer: nn.Module, fam, name: str, block, stats, ffn_init: str, inter: int):
    """(gate [C, H], up [C, H], down [H, C]) of the wide FFN this layer's student channels are taken from.

    ``merge``: every routed expert side by side, each down projection scaled by its routing frequency
    times the layer's mean routed mass (the MoE with its gates replaced by their expected values),
    plus the shared expert scaled by its mean gate. ``top``: the shared expert plus the most-used
    routed experts (enough to fill ``inter``), each weighted by its share of their routing.
    """
    if block is None:  # a dense teacher layer (also DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
        return expert_weights(getattr(t_layer, fam.ffn))
    s = stats[name]
    order = list(range(len(block.experts)))
    if ffn_init == "top":
        width = expert_weights(block.experts[0], fam.expert)[0].shape[0]
        need = inter - (expert_weights(getattr(block, fam.shared))[0].shape[0] if fam.shared else 0)
        order = s.freq.argsort(descending=True).tolist()[: max(1, -(-need // width))]
    share = s.freq[order] / s.freq[order].sum()
    parts = [(*expert_weights(block.experts[e], fam.expert), float(w) * s.mass) for e, w in zip(order, share)]
    if fam.shared:
        # Qwen2-MoE's shared expert has an input-dependent sigmoid gate: it enters with its mean value on the
        # calibration data (s.shared_gate), the one scalar a dense FFN can carry; DeepSeek's is ungated (1.0)
        parts.insert(0, (*expert_weights(getattr(block, fam.shared)), s.shared_gate))
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[3] * p[2] for p in parts], dim=1))


def _fill_ffn(s_mlp: nn.Module, ws, inter: int, ti: int) -> None:
    if ws[0].shape[0] < inter:
        raise RecipeError(f"{_FIELD}.intermediate_size {inter} is wider than teacher layer {ti}'s FFN ({ws[0].shape[0]} channels)",
                          hint=f"use at most {ws[0].shape[0]} or ffn_init: random")
    # keep the channels with the largest down-projection norm when the student is narrower
    idx = ws[2].norm(dim=0).argsort(descending=True)[:inter].sort().values
    s_mlp.gate_proj.weight.copy_(ws[0][idx])
    s_mlp.up_proj.weight.copy_(ws[1][idx])
    s_mlp.down_proj.weight.copy_(ws[2][:, idx])


def build_student(teacher: nn.Module, layers: list[int] | None = None, keep_every: int | None = None,
                  intermediate_size: int | None = None, ffn_init: str = "merge", calibration=None, seed: int = 0):
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
        raise RecipeError(f"{_FIELD}.ffn_init: {ffn_init!r} is not one of merge, top, random", hint="use ffn_init: merge")
    if intermediate_size is not None and intermediate_size <= 0:
        raise RecipeError(f"{_FIELD}.intermediate_size: {intermediate_size} must be positive", hint="give a width > 0 or leave it out")
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
    with torch.no_grad():
        for dst, src in ((s_model.embed_tokens, t_model.embed_tokens), (s_model.norm, t_model.norm), (student.lm_head, teacher.lm_head)):
            _copy_module(dst, src)
        for si, ti in enumerate(keep):
            sl, tl = s_model.layers[si], t_model.layers[ti]
            for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
                _copy_module(getattr(sl, part), getattr(tl, part))
            if ffn_init != "random":
                name = f"model.layers.{ti}.{fam.ffn}"
                ws = _channels(tl, fam, name, blocks.get(name), stats, ffn_init, cfg.intermediate_size)
                _fill_ffn(sl.mlp, ws, cfg.intermediate_size, ti)
    student.eval()
    info = {"family": tcfg.model_type, "student": cfg.model_type, "layers": keep, "ffn_init": ffn_init,
            "router_frequencies": {k: [round(float(x), 4) for x in v.freq] for k, v in stats.items()},
            "routed_mass": {k: round(v.mass, 4) for k, v in stats.items()},
            "shared_gate": {k: round(v.shared_gate, 4) for k, v in stats.items() if v.shared_gate is not None}}
    return student, info
