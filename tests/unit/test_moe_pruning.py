"""Pruning MoE-family models: routed experts of MoE students, FFN channels and layers of DeepSeek (MLA) students.

Expert equivalence: the unpruned model whose removed experts can never be chosen (router logit -inf, or
a score-correction / router bias of -1e9) computes the same logits as the pruned model.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_moe_families import MOE, ids, logits, make_teacher

from dsk_compress.errors import InvalidArgument

# renormalised top-k (or softmax scores over the experts that remain), so removing never-chosen experts leaves every
# routing weight unchanged; grouped routers with 8 experts in 2 groups (2 of 4 kept per group)
KW = {
    "qwen2_moe": {"norm_topk_prob": True},
    "qwen3_moe": {"norm_topk_prob": True},
    "olmoe": {"norm_topk_prob": True},
    "deepseek_v2": {"n_routed_experts": 8},
    "deepseek_v3": {"n_routed_experts": 8},
    "glm4_moe": {"n_routed_experts": 8},
}
GROUPED = ("deepseek_v2", "deepseek_v3", "glm4_moe")


def _pruned_pair(kind, tmp_path, ratio=0.5):
    from dsk_compress.compress.moe import experts_keep, prune_experts

    orig = make_teacher(kind, tmp_path / "t", all_sparse=True, **KW.get(kind, {}))
    pruned = make_teacher(kind, tmp_path / "t2", all_sparse=True, **KW.get(kind, {}))  # same seed: same weights
    calib = [ids(4, 16, seed=s) for s in (2, 3)]
    keep = experts_keep(pruned.config, ratio)
    info = prune_experts(pruned, keep, calib)
    return orig, pruned, keep, info


@contextlib.contextmanager
def _removed_unreachable(kind, model, info):
    """The removed experts of ``model`` made unreachable: a correction bias of -1e9 (sigmoid routers), else the router's
    logits of those experts set to -inf as its own F.linear computes them."""
    from dsk_compress.compress.moe import Experts, family, moe_blocks, router_of

    fam = family(model.config)
    masks = {}
    for name, block in moe_blocks(model):
        removed = sorted(set(range(len(Experts(block, fam)))) - set(info[name]["kept"]))
        router = router_of(fam, block)
        if getattr(router, "e_score_correction_bias", None) is not None:
            with torch.no_grad():
                router.e_score_correction_bias[removed] = -1e9
        else:
            masks[id(router.weight)] = torch.tensor(removed)
    linear = F.linear

    def masked(x, w, b=None):
        out = linear(x, w, b)
        r = masks.get(id(w))
        return out if r is None else out.index_fill(-1, r, float("-inf"))

    F.linear = masked
    try:
        yield
    finally:
        F.linear = linear


@pytest.mark.parametrize("kind", MOE)
def test_pruned_model_equals_the_model_whose_removed_experts_are_unreachable(kind, tmp_path):
    from dsk_compress.compress.moe import Experts, expert_structure, family, moe_blocks, n_experts, router_of

    orig, pruned, keep, info = _pruned_pair(kind, tmp_path)
    fam = family(orig.config)
    n = n_experts(orig.config)
    assert keep == n // 2
    assert n_experts(pruned.config) == keep
    for (name, block), (_, ob) in zip(moe_blocks(pruned), moe_blocks(orig)):
        ex, oex = Experts(block, fam), Experts(ob, fam)
        assert len(ex) == keep
        assert router_of(fam, block).weight.shape[0] == keep
        kept = info[name]["kept"]
        freq = torch.tensor(info[name]["frequencies"])
        groups = 2 if kind in GROUPED else 1
        per = n // groups
        for g in range(groups):  # the kept experts of each group are its most used
            mine = [k - g * per for k in kept if g * per <= k < (g + 1) * per]
            assert len(mine) == keep // groups
            f = freq[g * per : (g + 1) * per]
            assert f[mine].min() >= f[[j for j in range(per) if j not in mine]].max()
        for new, old in enumerate(kept):
            assert torch.equal(router_of(fam, block).weight[new], router_of(fam, ob).weight[old])
            for a, b in zip(ex.expert(new), oex.expert(old)):  # index_select on the 3-D parameters (or the ModuleList)
                assert (a is None and b is None) or torch.equal(a, b)
    x = ids(3, 16, seed=7)
    with _removed_unreachable(kind, orig, info):
        ref = logits(orig, x)
    assert torch.allclose(ref, logits(pruned, x), atol=1e-5, rtol=0)
    s0, s1 = expert_structure(orig), expert_structure(pruned)
    assert s1["experts"] == [keep] * s0["moe_layers"]
    router_rows = sum((n - keep) * (p.shape[1] if p.ndim == 2 else 1) for _, b in moe_blocks(orig) for p in router_of(fam, b).parameters())
    assert s0["active_params"] - s1["active_params"] == router_rows  # per token only the router got smaller
    assert s0["params"] - s1["params"] == router_rows + sum((n - keep) * Experts(b, fam).params_per_expert() for _, b in moe_blocks(orig))


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


@pytest.mark.parametrize(
    "kind,ratio,text",
    [
        ("mixtral", 0.75, "leaves 1 experts per MoE layer, too few for the router (num_experts_per_tok 2"),
        ("deepseek_v3", 0.5, "in 2 routing groups"),  # 4 experts in 2 groups: one per group cannot be scored by its top-2
        ("glm4_moe", 0.5, "in 2 routing groups"),
    ],
)
def test_too_few_experts_names_expert_ratio(kind, ratio, text, tmp_path):
    from dsk_compress.compress.moe import experts_keep

    m = make_teacher(kind, tmp_path / "t", all_sparse=True)
    with pytest.raises(InvalidArgument, match="expert_ratio") as e:
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
    with pytest.raises(InvalidArgument, match="head_ratio 0.5: the model \\(deepseek_v3\\) has multi-head latent attention"):
        prune_step(student, x[:1], ffn_ratio=0.0, head_ratio=0.5)
