"""Pruning MoE-family models: routed experts of MoE students, FFN channels and layers of DeepSeek (MLA) students.

Expert equivalence: the unpruned model whose removed experts can never be chosen (router logit -inf, or
DeepSeek's score-correction bias -1e9) computes the same logits as the pruned model.
"""

from __future__ import annotations

import pytest
import torch
from test_moe_families import MOE, ids, logits, make_teacher

from dsk_compress.errors import RecipeError

# renormalised top-k, so removing never-chosen experts leaves every routing weight unchanged;
# DeepSeek-V3 with 8 experts in 2 groups (2 of 4 kept per group)
KW = {"mixtral": {}, "qwen2_moe": {"norm_topk_prob": True}, "qwen3_moe": {"norm_topk_prob": True}, "deepseek_v3": {"n_routed_experts": 8}}
N_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def _pruned_pair(kind, tmp_path, ratio=0.5):
    from dsk_compress.compress.moe import experts_keep, prune_experts

    orig = make_teacher(kind, tmp_path / "t", all_sparse=True, **KW[kind])
    pruned = make_teacher(kind, tmp_path / "t2", all_sparse=True, **KW[kind])  # same seed: same weights
    calib = [ids(4, 16, seed=s) for s in (2, 3)]
    keep = experts_keep(pruned.config, ratio)
    info = prune_experts(pruned, keep, calib)
    return orig, pruned, keep, info


def _mask_removed(kind, model, info):
    """Hooks/biases that make the removed experts of ``model`` unreachable; returns hook handles."""
    from dsk_compress.compress.moe import moe_blocks

    handles = []
    for name, block in moe_blocks(model):
        removed = sorted(set(range(len(block.experts))) - set(info[name]["kept"]))
        if kind == "deepseek_v3":
            with torch.no_grad():
                block.gate.e_score_correction_bias[removed] = -1e9
        else:
            handles.append(block.gate.register_forward_hook(lambda m, a, out, r=removed: out.index_fill(-1, torch.tensor(r), float("-inf"))))
    return handles


@pytest.mark.parametrize("kind", MOE)
def test_pruned_model_equals_the_model_whose_removed_experts_are_unreachable(kind, tmp_path):
    from dsk_compress.compress.moe import expert_structure, moe_blocks

    orig, pruned, keep, info = _pruned_pair(kind, tmp_path)
    n = getattr(orig.config, N_KEY[kind])
    assert keep == n // 2
    assert getattr(pruned.config, N_KEY[kind]) == keep
    for (name, block), (_, ob) in zip(moe_blocks(pruned), moe_blocks(orig)):
        assert len(block.experts) == keep
        assert block.gate.weight.shape[0] == keep
        kept = info[name]["kept"]
        freq = torch.tensor(info[name]["frequencies"])
        groups = 2 if kind == "deepseek_v3" else 1
        per = n // groups
        for g in range(groups):  # the kept experts of each group are its most used
            mine = [k - g * per for k in kept if g * per <= k < (g + 1) * per]
            assert len(mine) == keep // groups
            f = freq[g * per:(g + 1) * per]
            assert f[mine].min() >= f[[j for j in range(per) if j not in mine]].max()
        for new, old in enumerate(kept):
            assert torch.equal(block.gate.weight[new], ob.gate.weight[old])
    _mask_removed(kind, orig, info)
    x = ids(3, 16, seed=7)
    assert torch.allclose(logits(orig, x), logits(pruned, x), atol=1e-5, rtol=0)
    s0, s1 = expert_structure(orig), expert_structure(pruned)
    assert s1["experts"] == [keep] * s0["moe_layers"]
    router_rows = sum((n - keep) * b.gate.weight.shape[1] for _, b in moe_blocks(orig))
    assert s0["active_params"] - s1["active_params"] == router_rows  # per token only the router got smaller
    assert s0["params"] - s1["params"] == router_rows + sum((n - keep) * sum(p.numel() for p in b.experts[0].parameters())
                                                            for _, b in moe_blocks(orig))


@pytest.mark.parametrize("kind", MOE)
def test_pruned_moe_saves_and_reloads_as_its_family(kind, tmp_path):
    from dsk_compress.compress.moe import expert_structure
    from dsk_compress.models.source import load_hf_dir, save_hf_dir

    _, pruned, keep, _ = _pruned_pair(kind, tmp_path)
    back = load_hf_dir(save_hf_dir(pruned, tmp_path / "saved"))
    assert type(back) is type(pruned)
    assert expert_structure(back)["experts"] == expert_structure(pruned)["experts"]
    x = ids(2, 12, seed=9)
    assert torch.allclose(logits(back, x), logits(pruned, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,ratio,text", [
    ("mixtral", 0.75, "leaves 1 experts per MoE layer, too few for the router (num_experts_per_tok 2"),
    ("deepseek_v3", 0.5, "in 2 routing groups"),  # 4 experts in 2 groups: one per group cannot be scored by its top-2
])
def test_too_few_experts_names_expert_ratio(kind, ratio, text, tmp_path):
    from dsk_compress.compress.moe import experts_keep

    m = make_teacher(kind, tmp_path / "t", all_sparse=True)
    with pytest.raises(RecipeError, match="expert_ratio") as e:
        experts_keep(m.config, ratio)
    assert text in e.value.message


@pytest.mark.parametrize("importance", ["l2", "activation"])
def test_deepseek_student_prunes_ffn_channels_and_layers_but_not_latent_attention_heads(importance, tmp_path):
    from dsk_compress.compress.prune import prune_step, structure
    from dsk_compress.compress.student import build_student
    from dsk_compress.models.source import load_hf_dir, save_hf_dir

    teacher = make_teacher("deepseek_v3", tmp_path / "t")
    student, _ = build_student(teacher, layers=[0, 1, 2], intermediate_size=32, calibration=[ids(2, 16)])
    x = ids(2, 16, seed=5)
    info = prune_step(student, x[:1], ffn_ratio=0.5, head_ratio=0.0, importance=importance, layers_removed=1, calibration=[x])
    assert [layer["ffn"] for layer in info["layers"]] == [16, 16]
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 16
    back = load_hf_dir(save_hf_dir(student, tmp_path / "s"))
    assert structure(back)["layers"] == info["layers"]
    assert torch.allclose(logits(back, x), logits(student, x), atol=1e-6, rtol=0)
    with pytest.raises(RecipeError, match="head_ratio 0.5: the student \\(deepseek_v3\\) has multi-head latent attention"):
        prune_step(student, x[:1], ffn_ratio=0.0, head_ratio=0.5)
