"""Build a dense student from a (MoE or dense) teacher: chosen layers, FFN initialised from experts."""

from __future__ import annotations

import torch
from torch import nn

from dsk_compress.compress.moe import moe_blocks, router_frequencies
from dsk_compress.errors import ModelSourceError, RecipeError


def select_layers(n_layers: int, layers: list[int] | None, keep_every: int | None) -> list[int]:
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise RecipeError(f"student.from_teacher.layers: {bad} out of range", hint=f"the teacher has layers 0..{n_layers - 1}")
        if len(set(layers)) != len(layers) or not layers:
            raise RecipeError("student.from_teacher.layers: give distinct, non-empty layer indices")
        return sorted(layers)
    k = keep_every or 2
    keep = list(range(0, n_layers, k))
    if keep[-1] != n_layers - 1:
        keep.append(n_layers - 1)
    return keep


def student_config(teacher_cfg, n_layers: int, intermediate_size: int | None):
    from transformers import LlamaConfig

    t = teacher_cfg
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    inter = intermediate_size or t.intermediate_size
    return LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=n_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=getattr(t, "num_key_value_heads", t.num_attention_heads),
        head_dim=head_dim,
        hidden_act=getattr(t, "hidden_act", "silu"),
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=getattr(t, "rope_theta", 10000.0),
        tie_word_embeddings=getattr(t, "tie_word_embeddings", False),
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _expert_ffn(expert: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) weights of one expert, whatever the family names them."""
    if hasattr(expert, "w1"):
        return expert.w1.weight, expert.w3.weight, expert.w2.weight
    if hasattr(expert, "gate_proj"):
        return expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight
    raise ModelSourceError(f"unsupported expert module {type(expert).__name__}", hint="supported: Mixtral-style experts")


def build_student(teacher: nn.Module, layers: list[int] | None = None, keep_every: int | None = None,
                  intermediate_size: int | None = None, ffn_init: str = "merge", calibration=None, seed: int = 0):
    """Cut a dense Llama-family student from ``teacher``.

    Attention, norms, embeddings and the LM head are copied from the kept teacher layers. Each dense
    FFN is initialised from that layer's experts: ``merge`` places all experts side by side with each
    down projection scaled by its router frequency on ``calibration`` batches (the MoE with its gates
    replaced by their expected values) and keeps the ``intermediate_size`` channels with the largest
    down-projection norm; ``top`` copies the most-used expert; ``random`` keeps the fresh
    initialisation. A dense teacher's FFN is copied.

    Returns:
        (student, info) where info records the kept layers and router frequencies.
    """
    from transformers import LlamaForCausalLM

    tcfg = teacher.config
    keep = select_layers(tcfg.num_hidden_layers, layers, keep_every)
    cfg = student_config(tcfg, len(keep), intermediate_size)
    torch.manual_seed(seed)
    student = LlamaForCausalLM(cfg)
    student.config._attn_implementation = "eager"
    t_model = teacher.model
    s_model = student.model
    freqs: dict[str, torch.Tensor] = {}
    blocks = dict(moe_blocks(teacher))
    if blocks and ffn_init in ("merge", "top"):
        if calibration is None:
            raise ValueError("expert-based FFN init needs calibration batches")
        freqs = router_frequencies(teacher, calibration)
    with torch.no_grad():
        s_model.embed_tokens.weight.copy_(t_model.embed_tokens.weight)
        s_model.norm.weight.copy_(t_model.norm.weight)
        student.lm_head.weight.copy_(teacher.lm_head.weight)
        for si, ti in enumerate(keep):
            sl, tl = s_model.layers[si], t_model.layers[ti]
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(sl.self_attn, proj).weight.copy_(getattr(tl.self_attn, proj).weight)
            sl.input_layernorm.weight.copy_(tl.input_layernorm.weight)
            sl.post_attention_layernorm.weight.copy_(tl.post_attention_layernorm.weight)
            if ffn_init == "random":
                continue
            moe_name = next((n for n in blocks if n.startswith(f"model.layers.{ti}.")), None)
            if moe_name is None:  # dense teacher layer
                src = tl.mlp
                ws = (src.gate_proj.weight, src.up_proj.weight, src.down_proj.weight)
            else:
                block = blocks[moe_name]
                f = freqs[moe_name]
                if ffn_init == "top":
                    # the most-used expert; a wider student takes the next most-used ones beside it,
                    # each down projection weighted by its share of the chosen experts' routing
                    order = f.argsort(descending=True).tolist()
                    n = -(-cfg.intermediate_size // _expert_ffn(block.experts[0])[0].shape[0])
                    chosen = order[:n]
                    share = f[chosen] / f[chosen].sum()
                    parts = [_expert_ffn(block.experts[e]) for e in chosen]
                    ws = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                          torch.cat([float(w) * p[2] for w, p in zip(share, parts)], dim=1))
                else:
                    # merge in function space: the MoE output with its gates replaced by their expected
                    # values (router frequencies) is one wide FFN, all experts side by side with each down
                    # projection scaled by its frequency; the channels that carry most of it are kept below
                    parts = [_expert_ffn(e) for e in block.experts]
                    ws = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                          torch.cat([float(f[e]) * parts[e][2] for e in range(len(parts))], dim=1))
            inter = cfg.intermediate_size
            if ws[0].shape[0] < inter:
                raise RecipeError(f"student.from_teacher.intermediate_size {inter} is wider than the teacher's FFN ({ws[0].shape[0]})")
            # keep the channels with the largest down-projection norm when the student is narrower
            idx = ws[2].norm(dim=0).argsort(descending=True)[:inter].sort().values
            sl.mlp.gate_proj.weight.copy_(ws[0][idx])
            sl.mlp.up_proj.weight.copy_(ws[1][idx])
            sl.mlp.down_proj.weight.copy_(ws[2][:, idx])
    student.eval()
    info = {"layers": keep, "ffn_init": ffn_init, "router_frequencies": {k: [round(float(x), 4) for x in v] for k, v in freqs.items()}}
    return student, info
