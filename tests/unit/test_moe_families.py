"""Every supported teacher family: dense routing, router statistics, student init, bad input.

Tiny random-config models of each family are saved with save_pretrained and loaded back through
the recipe's ``teacher: {hf: DIR}`` route (nothing from a hub).
"""

from __future__ import annotations

import types

import pytest
import torch

from dsk_compress.errors import DskError, ExportError, InvalidArgument, ModelSourceError

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "granitemoe", "olmoe", "phimoe", "gpt_oss"]
V4 = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]  # the families this toolkit also reads under transformers 4.56-4.57
DENSE = ["llama", "mistral", "qwen2", "qwen3"]
STUDENT_CLASS = {
    "mixtral": "LlamaForCausalLM",
    "qwen2_moe": "Qwen2ForCausalLM",
    "qwen3_moe": "Qwen3ForCausalLM",
    "deepseek_v2": "DeepseekV3ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "granitemoe": "GraniteForCausalLM",
    "olmoe": "LlamaForCausalLM",
    "phimoe": "LlamaForCausalLM",
    "gpt_oss": "LlamaForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
APPROX = ["olmoe", "phimoe", "gpt_oss"]  # no dense counterpart in transformers: a Llama student that drops what it cannot hold
EXACT = [k for k in MOE if k not in APPROX]
VOCAB = 96
E, W, SHARED = 4, 16, 24  # routed experts, one expert's width, Qwen2-MoE shared expert width
# the width of one layer's merged FFN: every routed expert plus the shared one
MERGED = {**{k: E * W for k in MOE}, "qwen2_moe": E * W + SHARED, "deepseek_v2": E * W + W, "deepseek_v3": E * W + W, "glm4_moe": E * W + W}
SPARSE_LAYERS = {
    "mixtral": 3,
    "qwen2_moe": 2,
    "qwen3_moe": 1,
    "deepseek_v2": 2,
    "deepseek_v3": 2,
    "glm4_moe": 2,
    "granitemoe": 3,
    "olmoe": 3,
    "phimoe": 3,
    "gpt_oss": 3,
}
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)


def tiny_config(kind: str, all_sparse: bool = False, **kw):
    """A tiny config of ``kind``; MoE families mix dense and sparse layers unless ``all_sparse``."""
    from transformers import CONFIG_MAPPING

    first_dense = 0 if all_sparse else 1
    extra = {
        "mixtral": dict(intermediate_size=W, num_local_experts=E, num_experts_per_tok=2),
        # layer 1 dense through mlp_only_layers; norm_topk_prob left at its default (False)
        "qwen2_moe": dict(
            intermediate_size=MERGED["qwen2_moe"],
            moe_intermediate_size=W,
            shared_expert_intermediate_size=SHARED,
            num_experts=E,
            num_experts_per_tok=2,
            mlp_only_layers=[] if all_sparse else [1],
            qkv_bias=True,
        ),
        # decoder_sparse_step 2: only layer 1 sparse; head_dim 16 != hidden / heads
        "qwen3_moe": dict(
            intermediate_size=MERGED["qwen3_moe"],
            moe_intermediate_size=W,
            num_experts=E,
            num_experts_per_tok=2,
            decoder_sparse_step=1 if all_sparse else 2,
            head_dim=16,
        ),
        # MLA attention, first layer dense, 2 groups of 2 experts with 1 group per token (softmax scores), 1 shared expert
        "deepseek_v2": dict(
            intermediate_size=MERGED["deepseek_v2"],
            moe_intermediate_size=W,
            n_routed_experts=E,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            topk_method="group_limited_greedy",
            first_k_dense_replace=first_dense,
            routed_scaling_factor=1.5,
            **_MLA,
        ),
        # MLA attention, first layer dense, 2 groups of 2 experts with 1 group per token (sigmoid + correction bias), 1 shared expert
        "deepseek_v3": dict(
            intermediate_size=MERGED["deepseek_v3"],
            moe_intermediate_size=W,
            n_routed_experts=E,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=first_dense,
            routed_scaling_factor=2.5,
            **_MLA,
        ),
        # DeepSeek-V3 routing with GQA attention, q/k/v bias and half-rotary heads
        "glm4_moe": dict(
            intermediate_size=MERGED["glm4_moe"],
            moe_intermediate_size=W,
            n_routed_experts=E,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=first_dense,
            head_dim=8,
            attention_bias=True,
        ),
        # Granite's embedding / attention / residual / logit multipliers
        "granitemoe": dict(
            intermediate_size=W,
            num_local_experts=E,
            num_experts_per_tok=2,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=2.0,
        ),
        "olmoe": dict(intermediate_size=W, num_experts=E, num_experts_per_tok=2),
        "phimoe": dict(intermediate_size=W, num_local_experts=E, num_experts_per_tok=2),
        # attention sinks, biases everywhere, clamped SwiGLU, alternating sliding / full attention
        "gpt_oss": dict(
            intermediate_size=W,
            num_local_experts=E,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=32,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "llama": dict(intermediate_size=48, head_dim=8),
        "mistral": dict(intermediate_size=48, head_dim=8, sliding_window=None),
        "qwen2": dict(intermediate_size=48),
        "qwen3": dict(intermediate_size=48, head_dim=8),
    }[kind]
    return CONFIG_MAPPING[kind](**{**BASE, **extra, **kw})


def save_load(model, path):
    """save_pretrained, then load exactly as a recipe's ``teacher: {hf: DIR}`` does."""
    from dsk_compress.models.source import load_model_source
    from dsk_compress.recipes.schema import ModelSourceSpec

    model.save_pretrained(path, safe_serialization=True)
    return load_model_source(ModelSourceSpec(hf=str(path)).model_dump(exclude_none=True))


def make_teacher(kind: str, path, seed: int = 0, identical: bool = False, all_sparse: bool = False, **kw):
    """A saved and reloaded tiny teacher; ``identical`` copies expert 0 into every expert of a layer."""
    from transformers import AutoModelForCausalLM

    from dsk_compress.compress.moe import Experts, family, moe_blocks, router_of

    if _v4() and kind not in V4 + DENSE:
        pytest.skip(f"{kind}: this toolkit reads it under transformers 5 only")
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(kind, all_sparse, **kw), attn_implementation="eager").eval()
    with torch.no_grad():
        for _, block in moe_blocks(m):
            fam = family(m.config)
            router = router_of(fam, block)
            router.weight.normal_(0, 0.3)  # routing that depends on the token (some routers start at zero)
            if getattr(router, "e_score_correction_bias", None) is not None:  # shifted by a correction bias
                router.e_score_correction_bias.normal_(0, 0.05)
            ex = Experts(block, fam)
            if identical and ex.listed:
                for e in ex.module[1:]:
                    e.load_state_dict(ex.module[0].state_dict())
            elif identical:
                for p in ex.module.parameters():
                    p[1:] = p[0]
            if identical and kind == "deepseek_v2":  # no renormalised top-k: uniform scores make the routed mass constant
                router.weight.zero_()
            if identical and kind == "qwen2_moe":
                block.shared_expert_gate.weight.zero_()  # sigmoid(0) = 0.5 for every token: a constant gate
    return save_load(m, path)


def ids(n: int, t: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("kind", MOE + DENSE)
def test_family_table_finds_exactly_the_sparse_layers(kind, tmp_path):
    from dsk_compress.compress.moe import describe_layout, is_moe, moe_blocks

    t = make_teacher(kind, tmp_path / "t")
    found = [name for name, _ in moe_blocks(t)]
    built = [n for n, m in t.named_modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]
    assert found == built
    assert len(found) == SPARSE_LAYERS.get(kind, 0)
    assert is_moe(t) == (kind in MOE)
    assert describe_layout(t) == (
        "dense" if kind in DENSE else "ModuleList" if _v4() else "fused 3-D (gpt_oss)" if kind == "gpt_oss" else "fused 3-D (gate_up)"
    )


def _v4() -> bool:
    import transformers

    return transformers.__version__.startswith("4.")


@pytest.mark.parametrize("kind", MOE)
def test_expert_accessor_reads_what_the_family_computes(kind, tmp_path):
    """Experts.expert(e) as a gated FFN equals the family's own expert module on a token routed to e alone."""
    from dsk_compress.compress.moe import Experts, family, moe_blocks

    t = make_teacher(kind, tmp_path / "t")
    fam = family(t.config)
    block = moe_blocks(t)[-1][1]
    ex = Experts(block, fam)
    x = torch.randn(5, 32)
    for e in range(len(ex)):
        one = torch.zeros(5, len(ex))
        one[:, e] = 1.0
        got = ex.forward_all(x, one)
        idx, w = torch.full((5, 1), e), torch.ones(5, 1)
        with torch.no_grad():
            ref = ex.module(x, idx, w) if not ex.listed else ex.module[e](x)
            f = ex.silu_form(e)  # the same expert as a Llama MLP would compute it
            h = torch.nn.functional.silu(torch.nn.functional.linear(x, f.gate, f.gate_bias)) * torch.nn.functional.linear(
                x, f.up, f.up_bias
            )
            as_mlp = torch.nn.functional.linear(h, f.down, f.down_bias)
        assert (got - ref).abs().max().item() <= 1e-5
        assert (as_mlp - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", MOE)
def test_densify_matches_the_family_forward(kind, tmp_path):
    from dsk_compress.compress.moe import densify_moe, moe_blocks

    t = make_teacher(kind, tmp_path / "t")
    x = ids(2, 24)
    ref = logits(t, x)
    densify_moe(t)
    assert all(type(b).__name__.startswith("Dense") for _, b in moe_blocks(t))
    got = logits(t, x)
    assert (got - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 1e-2  # not a vacuous comparison


@pytest.mark.parametrize("kind", MOE)
def test_densified_block_traces_without_baking_in_the_routing(kind, tmp_path):
    import copy

    from dsk_compress.compress.moe import densify_moe, moe_blocks

    t = make_teacher(kind, tmp_path / "t")
    block = moe_blocks(t)[-1][1]
    sparse = copy.deepcopy(block)  # the family's own data-dependent forward, as the reference
    densify_moe(t)
    assert type(block).__name__.startswith("Dense")
    # traced on one token (it hits only top_k of the 4 experts), run on 18 tokens that use them all
    a, b = torch.randn(1, 1, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        traced = torch.jit.trace(block, (a,), check_trace=False)
        out, ref = traced(b), sparse(b)
    out, ref = (out[0], ref[0]) if isinstance(ref, tuple) else (out, ref)
    assert out.shape == (2, 9, 32)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", MOE)
def test_router_stats_match_an_independent_count(kind, tmp_path):
    from dsk_compress.compress.moe import family, moe_blocks, router_frequencies, router_of, router_stats

    t = make_teacher(kind, tmp_path / "t")
    batches = [ids(2, 16, s) for s in (3, 4)]
    seen: dict[str, list] = {}

    def hook(mod, inp, out, name):  # the router's own output: (logits, weights, idx) in transformers 5; logits or (idx, weights) in 4
        if isinstance(out, tuple) and len(out) == 3:
            _, w, idx = out
        elif isinstance(out, tuple):
            idx, w = out
        else:
            w, idx = torch.softmax(out.float(), -1).topk(blocks[name].top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True) if getattr(blocks[name], "norm_topk_prob", True) else w
        seen.setdefault(name, []).append((idx.reshape(-1), w.sum(-1)))

    blocks = dict(moe_blocks(t))
    fam = family(t.config)
    hs = [router_of(fam, b).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n, b in blocks.items()]
    stats = router_stats(t, batches)
    for h in hs:
        h.remove()
    assert list(stats) == list(blocks)
    for name, s in stats.items():
        idx = torch.cat([i for i, _ in seen[name]])
        mass = torch.cat([m for _, m in seen[name]])
        assert torch.allclose(s.freq, torch.bincount(idx, minlength=E).float() / idx.numel(), atol=1e-7)
        assert s.freq.shape == (E,) and float(s.freq.sum()) == pytest.approx(1.0, abs=1e-6)
        assert s.mass == pytest.approx(float(mass.mean()), rel=1e-6)
        # renormalised top-k (DeepSeek-V3: x routed_scaling_factor; Granite, gpt-oss: softmax over the top-k logits)
        expected_mass = {"mixtral": 1.0, "deepseek_v3": 2.5, "glm4_moe": 1.0, "granitemoe": 1.0, "gpt_oss": 1.0}.get(kind)
        if expected_mass is not None:
            assert s.mass == pytest.approx(expected_mass, rel=1e-5)
        elif kind == "deepseek_v2":  # 2 softmax probabilities of the group's 2 experts, x routed_scaling_factor 1.5
            assert 0.0 < s.mass < 1.5
        elif kind == "phimoe":  # sparsemixer: two softmax multipliers, each at most 1
            assert 0.5 < s.mass <= 2.0
        else:  # Qwen / OLMoE without norm_topk_prob: the top-2 of 4 softmax probabilities carry between 1/2 and 1
            assert 0.5 < s.mass < 1.0
        assert (s.shared_gate is None) == (kind not in ("qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"))
        if kind == "qwen2_moe":
            assert 0.0 < s.shared_gate < 1.0
    assert {n: f.tolist() for n, f in router_frequencies(t, batches).items()} == {n: s.freq.tolist() for n, s in stats.items()}


@pytest.mark.parametrize("init", ["merge", "top"])
@pytest.mark.parametrize("kind", EXACT)
def test_student_equals_teacher_whose_experts_are_identical(kind, init, tmp_path):
    from transformers import AutoModelForCausalLM

    from dsk_compress.compress.student import build_student

    # identical experts and a constant shared gate: the MoE is one dense FFN, so the student must equal it;
    # `top` on an all-sparse teacher takes the shared expert plus the single most-used routed expert
    t = make_teacher(kind, tmp_path / "t", identical=True, all_sparse=init == "top", norm_topk_prob=True)
    width = MERGED[kind] if init == "merge" else MERGED[kind] - (E - 1) * W
    s, info = build_student(t, keep_every=1, intermediate_size=width, ffn_init=init, calibration=[ids(2, 16, 5)])
    assert type(s).__name__ == STUDENT_CLASS[kind] and info["student"] == s.config.model_type
    assert info["layers"] == [0, 1, 2] and s.config.intermediate_size == width
    x = ids(2, 20, 6)
    ref, got = logits(t, x), logits(s, x)
    assert (got - ref).abs().max().item() <= 1e-4
    if kind == "qwen2_moe":
        assert set(info["shared_gate"].values()) == {0.5}
    s.save_pretrained(tmp_path / "s", safe_serialization=True)
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    assert type(r) is type(s) and r.config.num_hidden_layers == 3 and r.config.intermediate_size == width
    if kind not in ("deepseek_v2", "deepseek_v3", "glm4_moe"):  # those students are their own family with every layer dense
        assert not any(getattr(r.config, k, None) for k in ("num_local_experts", "num_experts")), "MoE fields leaked into the student"
    assert torch.equal(logits(r, x), got)


@pytest.mark.parametrize("kind", APPROX)
def test_approximate_student_says_what_it_drops_and_keeps_the_rest(kind, tmp_path):
    from dsk_compress.compress.moe import FAMILIES
    from dsk_compress.compress.student import build_student

    t = make_teacher(kind, tmp_path / "t", identical=True, all_sparse=True)
    s, info = build_student(t, keep_every=1, intermediate_size=W, ffn_init="top", calibration=[ids(2, 16, 5)])
    assert type(s).__name__ == "LlamaForCausalLM" and info["approximation"] == FAMILIES[kind].approx
    dropped = {"olmoe": "self_attn.q_norm.weight", "phimoe": "input_layernorm.bias", "gpt_oss": "self_attn.sinks"}[kind]
    assert f"model.layers.0.{dropped}" in info["dropped"]
    for k, v in s.model.layers[1].self_attn.state_dict().items():  # what fits is copied as it is
        assert torch.equal(v, t.model.layers[1].self_attn.state_dict()[k]), k


def test_deepseek_student_is_dense_and_keeps_mla_attention(tmp_path):
    from dsk_compress.compress.moe import is_moe
    from dsk_compress.compress.student import build_student

    t = make_teacher("deepseek_v3", tmp_path / "t")
    s, info = build_student(t, layers=[0, 2], ffn_init="merge", calibration=[ids(2, 16)])
    assert s.config.first_k_dense_replace == 2 and not is_moe(s)
    assert s.config.intermediate_size == W and s.model.layers[1].mlp.gate_proj.out_features == W
    for k, v in t.model.layers[2].self_attn.state_dict().items():  # q_a/q_b/kv_a/kv_b projections and their norms
        assert torch.equal(s.model.layers[1].self_attn.state_dict()[k], v), k
    assert info["routed_mass"]["model.layers.2.mlp"] == 2.5  # norm_topk_prob: the top-k weights sum to routed_scaling_factor


def test_qwen2_student_merge_weights_shared_expert_by_its_mean_gate(tmp_path):
    from dsk_compress.compress.moe import Experts, family
    from dsk_compress.compress.student import build_student

    t = make_teacher("qwen2_moe", tmp_path / "t")
    s, info = build_student(t, layers=[2], intermediate_size=MERGED["qwen2_moe"], ffn_init="merge", calibration=[ids(2, 16)])
    blk, sm = t.model.layers[2].mlp, s.model.layers[0].mlp
    g = info["shared_gate"]["model.layers.2.mlp"]
    f, mass = info["router_frequencies"]["model.layers.2.mlp"], info["routed_mass"]["model.layers.2.mlp"]
    # full width keeps every channel in order: the shared expert first, then the routed experts
    assert torch.equal(sm.gate_proj.weight[:SHARED], blk.shared_expert.gate_proj.weight)
    assert torch.allclose(sm.down_proj.weight[:, :SHARED], g * blk.shared_expert.down_proj.weight, rtol=1e-3, atol=1e-7)
    ex = Experts(blk, family(t.config))
    for e in range(E):
        cols = slice(SHARED + e * W, SHARED + (e + 1) * W)
        assert torch.equal(sm.up_proj.weight[cols], ex.expert(e).up)
        assert torch.allclose(sm.down_proj.weight[:, cols], f[e] * mass * ex.expert(e).down, rtol=2e-3, atol=1e-7)
    assert torch.equal(s.model.layers[0].self_attn.q_proj.bias, t.model.layers[2].self_attn.q_proj.bias)


@pytest.mark.parametrize("kind", DENSE)
def test_dense_teacher_ffn_is_copied_and_sliced(kind, tmp_path):
    from dsk_compress.compress.student import build_student

    t = make_teacher(kind, tmp_path / "t")
    full, _ = build_student(t, keep_every=1, ffn_init="merge")  # no calibration needed: nothing is routed
    x = ids(2, 20)
    assert type(full).__name__ == STUDENT_CLASS[kind]
    assert (logits(full, x) - logits(t, x)).abs().max().item() <= 1e-5
    half, info = build_student(t, keep_every=2, intermediate_size=24, ffn_init="top")
    assert info["layers"] == [0, 2] and half.config.num_hidden_layers == 2
    tm, sm = t.model.layers[2].mlp, half.model.layers[1].mlp
    norms = tm.down_proj.weight.norm(dim=0)
    kept = norms.argsort(descending=True)[:24].sort().values  # the 24 channels with the largest down-projection norm
    assert sm.gate_proj.weight.shape == (24, 32)
    assert torch.equal(sm.gate_proj.weight, tm.gate_proj.weight[kept]) and torch.equal(sm.down_proj.weight, tm.down_proj.weight[:, kept])


def test_sliding_window_teacher_keeps_its_window(tmp_path):
    from dsk_compress.compress.student import build_student

    t = make_teacher("qwen3_moe", tmp_path / "t", identical=True, norm_topk_prob=True, use_sliding_window=True, sliding_window=4)
    s, _ = build_student(t, keep_every=1, intermediate_size=MERGED["qwen3_moe"], calibration=[ids(1, 16)])
    assert s.config.sliding_window == 4 and set(s.config.layer_types) == {"sliding_attention"}
    x = ids(1, 20, 8)
    assert (logits(s, x) - logits(t, x)).abs().max().item() <= 1e-4
    mx, _ = build_student(make_teacher("mixtral", tmp_path / "m", sliding_window=4), layers=[0], ffn_init="random")
    assert type(mx).__name__ == "MistralForCausalLM" and mx.config.sliding_window == 4


@pytest.fixture(scope="module")
def qwen_teacher(tmp_path_factory):
    return make_teacher("qwen2_moe", tmp_path_factory.mktemp("q") / "t")


@pytest.mark.parametrize(
    "kwargs, field, text",
    [
        (dict(layers=[0, 3]), "student.from_teacher.layers", r"\[3\] out of range"),
        (dict(layers=[-1]), "student.from_teacher.layers", r"\[-1\] out of range"),
        (dict(layers=[1, 1, 2]), "student.from_teacher.layers", r"repeated: \[1\]"),
        (dict(layers=[]), "student.from_teacher.layers", "non-empty"),
        (dict(intermediate_size=0), "student.from_teacher.intermediate_size", "must be positive"),
        (dict(intermediate_size=MERGED["qwen2_moe"] + 1), "student.from_teacher.intermediate_size", "wider than teacher layer 0's FFN"),
        (dict(ffn_init="average"), "student.from_teacher.ffn_init", "not one of merge, top, random"),
    ],
)
def test_bad_student_input_names_the_field(qwen_teacher, kwargs, field, text):
    from dsk_compress.compress.student import build_student
    from dsk_compress.recipes.base import field_error

    with pytest.raises(InvalidArgument, match=text) as e:
        build_student(qwen_teacher, **{"calibration": [ids(1, 8)], **kwargs})
    assert e.value.argument == field.rsplit(".", 1)[1] and e.value.hint
    assert str(field_error(e.value)).startswith(field)  # what the recipe layer says


@pytest.mark.parametrize(
    "kw, text",
    [
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
        (dict(hidden_size=60, num_attention_heads=8, num_key_value_heads=8), "hidden_size 60 is not divisible by num_attention_heads 8"),
    ],
)
def test_teacher_whose_heads_do_not_divide_is_refused(kw, text):
    from transformers import MixtralConfig

    from dsk_compress.compress.student import build_student

    cfg = MixtralConfig(**{**BASE, "intermediate_size": W, **kw})
    with pytest.raises(ModelSourceError, match=text) as e:
        build_student(types.SimpleNamespace(config=cfg), layers=[0], ffn_init="random")
    assert "config.json" in e.value.hint


def test_unsupported_architecture_lists_the_supported_families(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, JetMoeConfig, JetMoeForCausalLM

    from dsk_compress.compress.moe import densify_moe, moe_blocks
    from dsk_compress.compress.student import build_student

    gpt2 = save_load(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)), tmp_path / "g")
    with pytest.raises(ModelSourceError, match="architecture 'gpt2' is not supported") as e:
        build_student(gpt2, layers=[0])
    assert (
        "supported: mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, glm4_moe, granitemoe, olmoe, phimoe, gpt_oss" in e.value.hint
    )
    assert moe_blocks(gpt2) == [] and densify_moe(gpt2) is gpt2  # a dense model of any family exports as it is
    jet = JetMoeForCausalLM(
        JetMoeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_key_value_heads=2,
            kv_channels=8,
            intermediate_size=W,
            num_local_experts=E,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(DskError, match="architecture 'jetmoe' is not supported"):
        densify_moe(jet)  # an MoE of an unknown family must not be exported with the wrong routing
    assert moe_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4))) == []  # a non-HF torch model has no MoE blocks


@pytest.mark.parametrize("kind", MOE)
def test_densified_teacher_exports_to_onnx_and_matches_on_other_inputs(kind, tmp_path):
    import numpy as np

    from dsk_compress.compress.moe import densify_moe
    from dsk_compress.export.onnx import export_causal_lm, ort_predict

    t = densify_moe(make_teacher(kind, tmp_path / "t"))
    if kind == "deepseek_v2":  # its rotary is complex-valued: the exporter names the operator (the student is a DeepseekV3)
        with pytest.raises(ExportError, match="aten::polar"):
            export_causal_lm(t, np.zeros((1, 4), np.int64), tmp_path / "t.onnx")
        return
    p = export_causal_lm(t, np.zeros((1, 4), np.int64), tmp_path / "t.onnx")  # 4 identical tokens: few experts hit
    x = ids(2, 20, 9).numpy()
    assert np.abs(ort_predict(p)(x) - logits(t, torch.as_tensor(x)).numpy()).max() <= 1e-4


def test_quantized_checkpoint_is_refused_with_a_dequantize_hint(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from dsk_compress.models.source import load_hf_dir

    AutoModelForCausalLM.from_config(tiny_config("deepseek_v3")).save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}  # as DeepSeek-V3 ships
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="quantized .*quant_method=fp8") as e:
        load_hf_dir(tmp_path / "t")
    assert "dequantize" in e.value.hint


@pytest.mark.parametrize(
    "kind, says",
    [
        ("mixtral", None),
        ("qwen2_moe", None),
        ("qwen3_moe", None),
        ("deepseek_v3", "multi-head latent attention"),
        ("deepseek_v2", "does not export to ONNX"),
        ("glm4_moe", "no fused decoder graph"),
        ("granitemoe", "scales embeddings"),
        ("olmoe", "q_norm/k_norm"),
        ("phimoe", "LayerNorms become RMSNorms"),
        ("gpt_oss", "attention sinks"),
    ],
)
def test_student_notes_state_what_the_cut_cannot_serve(kind, says):
    """What `recipe --dry-run` prints and the report's student notes carry, from the teacher's config alone."""
    from dsk_compress.compress.moe import student_notes

    if _v4() and kind not in V4:
        pytest.skip(f"{kind}: transformers 5 only")
    notes = student_notes(tiny_config(kind).to_dict())
    assert (notes == []) if says is None else any(says in n for n in notes)
