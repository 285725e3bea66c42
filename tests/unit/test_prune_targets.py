"""Depth pruning, activation importance, grouped-query head pruning and params / MACs / latency targets.

Every count below is worked out by hand from the tiny configs (vocab 256, hidden 64, head_dim 16).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import kept_rows, tiny_llama

V, HID, D = 256, 64, 16  # tiny_llama: vocab, hidden, head_dim


def tiny_qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(
        vocab_size=V,
        hidden_size=HID,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    m.config._attn_implementation = "eager"
    return m


def _build(family: str, **kw):
    return tiny_llama(**kw) if family == "llama" else tiny_qwen2(**kw)


def _calib(n=2, bs=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (bs, t), generator=g) for _ in range(n)]


def _logits(m, x):
    with torch.no_grad():
        return m(input_ids=x, use_cache=False).logits


def _cached_decode_matches(m, x, atol=1e-5) -> float:
    """Max |logits| difference between a prefix + one cached decode step and the full forward."""
    with torch.no_grad():
        full = m(input_ids=x, use_cache=False).logits[:, -1]
        out = m(input_ids=x[:, :-1], use_cache=True)
        step = m(input_ids=x[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    return float((full - step).abs().max())


# --------------------------------------------------------------------------------- depth


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_depth_prune_removes_identity_layer_first_and_keeps_logits(family, tmp_path):
    from dsk_compress.compress.prune import block_influence, prune_step
    from dsk_compress.models.source import load_hf_dir, save_hf_dir

    m = _build(family, num_hidden_layers=3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: an identity block
        m.model.layers[1].self_attn.o_proj.weight.zero_()
        m.model.layers[1].mlp.down_proj.weight.zero_()
    calib = _calib()
    bi = block_influence(m, calib)
    assert bi[1] == pytest.approx(0.0, abs=1e-12) and min(bi[0], bi[2]) > 1e-4
    x = torch.randint(0, V, (2, 20))
    ref = _logits(m, x)
    after = prune_step(m, x[:1], ffn_ratio=0.0, head_ratio=0.0, layers_removed=1, calibration=calib)
    assert after["removed_layers"] == [1] and len(after["layers"]) == 2
    assert float((_logits(m, x) - ref).abs().max()) <= 1e-5
    assert m.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in m.model.layers] == [0, 1]
    if family == "qwen2":
        assert m.config.layer_types == ["full_attention", "full_attention"]
    assert _cached_decode_matches(m, x) <= 1e-5  # KV-cache slots follow the renumbered layers
    save_hf_dir(m, tmp_path / "p")
    r = load_hf_dir(tmp_path / "p")
    assert r.config.num_hidden_layers == 2 and len(r.model.layers) == 2
    assert torch.allclose(_logits(r, x), ref, atol=1e-5, rtol=0)


def test_depth_prune_errors_name_the_argument():
    from dsk_compress.compress.prune import layers_to_remove, prune_step
    from dsk_compress.errors import InvalidArgument

    m = tiny_llama(num_hidden_layers=3)
    with pytest.raises(InvalidArgument, match="layers_removed 3 removes every decoder layer") as e:
        prune_step(m, torch.randint(0, V, (1, 8)), 0.0, 0.0, layers_removed=3, calibration=_calib())
    assert e.value.argument == "layers_removed"
    with pytest.raises(InvalidArgument, match="depth_ratio 0.2 removes no layer") as e:
        layers_to_remove(3, depth_ratio=0.2)
    assert e.value.argument == "depth_ratio"
    with pytest.raises(InvalidArgument, match="layers_removed and depth_ratio are both given"):
        layers_to_remove(3, layers_removed=1, depth_ratio=0.5)
    # rounded down, so a ratio below 1 always leaves a layer
    assert [layers_to_remove(n, depth_ratio=r) for n, r in ((4, 0.5), (3, 0.5), (3, 0.99))] == [2, 1, 2]


def test_recipe_errors_for_conflicting_prune_fields_name_the_field():
    from dsk_compress.errors import RecipeError
    from dsk_compress.recipes import load_recipe

    with pytest.raises(RecipeError) as e:  # the bundled recipe sets ffn_ratio: 0.5
        load_recipe("quant-prune-distill", ["stages.1.target.params=0.5"])
    assert "stages.1" in e.value.message and "target and ffn_ratio" in e.value.message
    spec = load_recipe("quant-prune-distill", ["stages.1.ffn_ratio=0", "stages.1.target.params=0.5"])
    assert spec.stages[1].target.params == 0.5 and spec.stages[1].effective_ffn_ratio == 0.0
    for sets, needle in (
        (["stages.1.layers_removed=1", "stages.1.depth_ratio=0.5"], "layers_removed or depth_ratio"),
        (["stages.1.ffn_ratio=0", "stages.1.target.params=0.5", "stages.1.target.macs=0.5"], "exactly one of params, macs, latency_ms"),
        (["stages.1.ffn_ratio=0", "stages.1.target.latency_ms=5", "stages.1.target.device=rpi5"], "target.device 'rpi5'"),
        (["stages.1.ffn_ratio=0", "stages.1.target.latency_ms=5", "stages.1.iterations=2"], "remove iterations"),
        (["stages.1.importance=fisher"], "stages.1.importance"),
    ):
        with pytest.raises(RecipeError) as e:
            load_recipe("quant-prune-distill", sets)
        assert needle in e.value.message and "stages.1" in e.value.message
    # depth alone keeps FFN width (ffn_ratio defaults to 0 next to layers_removed), plain width pruning defaults to 0.5
    from dsk_compress.recipes.schema import PruneConfig

    assert PruneConfig(layers_removed=1).effective_ffn_ratio == 0.0 and PruneConfig().effective_ffn_ratio == 0.5


# --------------------------------------------------------------------------------- activation importance


def test_activation_importance_prunes_exactly_the_silenced_ffn_channels():
    from dsk_compress.compress.prune import prune_step

    m = tiny_llama(intermediate_size=128)
    silenced = []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in m.model.layers:
            s = torch.randperm(128, generator=g)[:64].sort().values
            silenced.append(set(s.tolist()))
            layer.mlp.up_proj.weight[s] = 0  # act(gate) * up == 0 on every input
            layer.mlp.gate_proj.weight[s] *= 10  # ... while their weights are the largest: magnitude would keep them
            layer.mlp.down_proj.weight[:, s] *= 10
    orig = [layer.mlp.gate_proj.weight.clone() for layer in m.model.layers]
    by_l2 = tiny_llama(intermediate_size=128)
    by_l2.load_state_dict(m.state_dict())
    x = torch.randint(0, V, (1, 16))

    after = prune_step(m, x, ffn_ratio=0.5, head_ratio=0.0, importance="activation", calibration=_calib())
    assert [layer["ffn"] for layer in after["layers"]] == [64, 64]
    for o, layer, s in zip(orig, m.model.layers, silenced):
        assert set(range(128)) - set(kept_rows(o, layer.mlp.gate_proj.weight)) == s
    y = torch.randint(0, V, (2, 12))
    assert float((_logits(m, y) - _logits(by_l2, y)).abs().max()) <= 1e-5  # the removed channels carried nothing (by_l2: unpruned copy)
    # weight magnitude picks the opposite set on the same model
    prune_step(by_l2, x, ffn_ratio=0.5, head_ratio=0.0, importance="l2")
    for o, layer, s in zip(orig, by_l2.model.layers, silenced):
        assert set(kept_rows(o, layer.mlp.gate_proj.weight)) == s


def test_activation_importance_prunes_the_silent_kv_group():
    from dsk_compress.compress.prune import prune_step

    m = tiny_llama(num_key_value_heads=2)  # 4 query heads in 2 KV groups
    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            a.v_proj.weight[:D] = 0  # KV group 0 (query heads 0, 1) outputs zero
            a.q_proj.weight[: 2 * D] *= 10
            a.k_proj.weight[:D] *= 10
            a.o_proj.weight[:, : 2 * D] *= 10
    k1 = [layer.self_attn.k_proj.weight[D:].clone() for layer in m.model.layers]
    x = torch.randint(0, V, (2, 16))
    ref = _logits(m, x)
    after = prune_step(m, x[:1], ffn_ratio=0.0, head_ratio=0.5, importance="activation", calibration=_calib())
    assert [(s["heads"], s["kv_heads"]) for s in after["layers"]] == [(2, 1), (2, 1)]
    for k, layer in zip(k1, m.model.layers):
        assert torch.equal(layer.self_attn.k_proj.weight, k)
    assert float((_logits(m, x) - ref).abs().max()) <= 1e-5


# --------------------------------------------------------------------------------- grouped-query attention


@pytest.mark.parametrize("family,importance", [("llama", "l2"), ("llama", "taylor"), ("qwen2", "l1")])
def test_gqa_head_pruning_removes_whole_kv_groups_and_equals_zeroed_o_proj(family, importance, tmp_path):
    from dsk_compress.compress.prune import prune_step
    from dsk_compress.models.source import load_hf_dir, save_hf_dir

    m = _build(family, num_attention_heads=4, num_key_value_heads=2, **({"head_dim": D} if family == "llama" else {}))
    ref = _build(family, num_attention_heads=4, num_key_value_heads=2, **({"head_dim": D} if family == "llama" else {}))
    orig_k = [layer.self_attn.k_proj.weight.clone() for layer in m.model.layers]
    x = torch.randint(0, V, (2, 20))
    after = prune_step(m, x[:1], ffn_ratio=0.0, head_ratio=0.5, importance=importance, timeout_s=60)
    assert [(s["heads"], s["kv_heads"], s["ffn"]) for s in after["layers"]] == [(2, 1, 128), (2, 1, 128)]
    assert (m.config.num_attention_heads, m.config.num_key_value_heads) == (2, 1)
    assert all(layer.self_attn.num_key_value_groups == 2 for layer in m.model.layers)
    with torch.no_grad():
        for o, lr, lp in zip(orig_k, ref.model.layers, m.model.layers):
            kv_rows = kept_rows(o, lp.self_attn.k_proj.weight)
            group = kv_rows[0] // D
            assert kv_rows == list(range(group * D, (group + 1) * D))  # one whole KV head
            gone = [h for h in range(4) if h // 2 != group]  # the other group's two query heads
            for h in gone:
                lr.self_attn.o_proj.weight[:, h * D : (h + 1) * D] = 0
    assert float((_logits(m, x) - _logits(ref, x)).abs().max()) <= 1e-5
    assert _cached_decode_matches(m, x) <= 1e-5
    save_hf_dir(m, tmp_path / "p")
    r = load_hf_dir(tmp_path / "p")
    assert (r.config.num_attention_heads, r.config.num_key_value_heads) == (2, 1)
    assert torch.allclose(_logits(r, x), _logits(m, x), atol=1e-6, rtol=0)


def test_gqa_heads_and_ffn_together_and_ratio_that_leaves_no_group():
    from dsk_compress.compress.prune import check_prunable, prune_step
    from dsk_compress.errors import InvalidArgument

    m = tiny_llama(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    after = prune_step(m, torch.randint(0, V, (1, 16)), ffn_ratio=0.25, head_ratio=0.5, importance="l2", timeout_s=60)
    assert [(s["heads"], s["kv_heads"], s["ffn"]) for s in after["layers"]] == [(4, 2, 96), (4, 2, 96)]
    assert m.config.head_dim == 8 and m.config.intermediate_size == 96
    with pytest.raises(InvalidArgument, match="head_ratio 0.9 leaves no attention heads"):
        check_prunable(tiny_llama(num_key_value_heads=2).config, 0.0, 0.9, 8)


# --------------------------------------------------------------------------------- params / MAC targets


def _params(layers=2, kv=4, heads=4, ffn=128):
    """Parameter count of tiny_llama by hand: embeddings + LM head + final norm + per layer q,k,v,o, MLP, 2 norms."""
    return 2 * V * HID + HID + layers * (HID * heads * D * 2 + HID * kv * D * 2 + 3 * HID * ffn + 2 * HID)


def _macs(t=16, layers=2, kv=4, heads=4, ffn=128):
    """MACs of one forward by hand: per token Linears + LM head, attention scores and values, rotary (d/2 x t; transformers 5
    computes the rotary angles without a matmul)."""
    import transformers

    linear = t * (HID * V + layers * (HID * heads * D * 2 + HID * kv * D * 2 + 3 * HID * ffn))
    return linear + layers * 2 * heads * t * t * D + ((D // 2) * t if transformers.__version__.startswith("4.") else 0)


def test_count_macs_matches_hand_count():
    from dsk_compress.compress.prune import count_macs

    assert count_macs(tiny_llama(), 16) == _macs() in (1_638_528, 1_638_400)
    assert count_macs(tiny_llama(num_key_value_heads=2, intermediate_size=40), 16) == _macs(kv=2, ffn=40)


def test_params_target_solves_the_least_pruning_within_budget():
    from dsk_compress.compress.prune import Shape, count_params, prune_to, solve_target
    from dsk_compress.errors import InvalidArgument

    m = tiny_llama()
    p0 = _params()
    assert count_params(m) == p0 == 115_008
    # FFN only, 75%: per layer 3*64*ffn <= 10200 -> 53 channels -> 48 (multiple of 8)
    shape, info = solve_target(m, "params", 0.75, ["ffn"], 8, 16)
    assert shape == Shape(layers=2, kv_heads=4, heads=4, ffn=48)
    assert _params(ffn=48) <= 0.75 * p0 < _params(ffn=56)
    assert info["params_solved"] == _params(ffn=48) == 84_288
    # FFN + heads, 50%: one common ratio; 2 KV groups never fit, 1 group + 40 channels does (48 would not)
    shape, info = solve_target(m, "params", 0.5, ["ffn", "heads"], 8, 16)
    assert shape == Shape(layers=2, kv_heads=1, heads=1, ffn=40)
    assert _params(kv=1, heads=1, ffn=40) == 56_640 <= 0.5 * p0 < _params(kv=1, heads=1, ffn=48)
    prune_to(m, shape, "l2", example_inputs=torch.randint(0, V, (1, 16)))
    assert count_params(m) == 56_640
    with pytest.raises(InvalidArgument, match=r"params 0.5 is unreachable by pruning ffn up to max_ratio 0.9: .* keeps 0.599") as e:
        solve_target(tiny_llama(), "params", 0.5, ["ffn"], 8, 16)
    assert e.value.argument == "params"


def test_a_criterion_object_decides_which_channels_and_kv_groups_stay():
    """Importance criteria are objects: one of your own goes straight into prune_to and is scored by hand."""
    from dsk_compress.compress.prune import IMPORTANCES, Importance, Shape, importance, prune_to
    from dsk_compress.errors import InvalidArgument

    class Highest(Importance):  # keeps the channels and KV groups with the highest indices
        name = "highest"

        def ffn_channels(self, mlp, measured=None):
            return torch.arange(mlp.gate_proj.out_features, dtype=torch.float64)

        def kv_groups(self, attn, measured_heads=None):
            return torch.arange(attn.k_proj.out_features // attn.head_dim, dtype=torch.float64)

    m = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    gate, k = m.model.layers[1].mlp.gate_proj.weight.clone(), m.model.layers[1].self_attn.k_proj.weight.clone()
    prune_to(m, Shape(layers=2, kv_heads=1, heads=2, ffn=40), Highest(), example_inputs=torch.randint(0, V, (1, 8)))
    assert kept_rows(gate, m.model.layers[1].mlp.gate_proj.weight) == list(range(88, 128))
    assert kept_rows(k, m.model.layers[1].self_attn.k_proj.weight) == list(range(16, 32))  # KV group 1 of 2
    assert sorted(IMPORTANCES) == ["activation", "l1", "l2", "taylor"] and importance("l2") is IMPORTANCES["l2"]
    with pytest.raises(InvalidArgument, match="importance 'fisher' is unknown") as e:
        importance("fisher")
    assert e.value.argument == "importance"


def test_library_argument_errors_are_said_as_the_recipe_field():
    """Library code names its own argument; the recipe layer names the field the user edits."""
    from dsk_compress.errors import InvalidArgument
    from dsk_compress.recipes.base import field_error
    from dsk_compress.recipes.schema import PruneConfig
    from dsk_compress.recipes.stages.prune import PruneStage

    stage = PruneStage(PruneConfig(ffn_ratio=0.0, target={"params": 0.5}))
    e = field_error(InvalidArgument("params 0.5 is unreachable", "params", hint="raise params"), stage, 1)
    assert (e.message, e.hint) == ("stages.1.target.params 0.5 is unreachable", "raise params")
    assert (
        field_error(InvalidArgument("ffn_ratio 0.99 leaves nothing", "ffn_ratio"), stage, 3).message
        == "stages.3.ffn_ratio 0.99 leaves nothing"
    )
    assert field_error(InvalidArgument("drop: too many", "drop"), stage, 1).message == "stages.1.layers_removed: too many"
    assert (
        field_error(InvalidArgument("layers [9] out of range", "layers"), stage, 1).message
        == "student.from_teacher.layers [9] out of range"
    )
    assert field_error(InvalidArgument("task_tokenizer has 9 tokens", "task_tokenizer")).message == "task.tokenizer has 9 tokens"
    assert field_error(InvalidArgument("odd value", "whatever"), stage, 2).message == "stages.2 (prune): odd value"


def test_macs_target_solves_the_least_pruning_within_budget():
    from dsk_compress.compress.prune import count_macs, prune_to, solve_target

    m = tiny_llama()
    shape, info = solve_target(m, "macs", 0.75, ["ffn"], 8, 16)
    # 16 tokens x 2 layers x 192 MACs per channel <= 0.75 * 1,638,528 - the rest -> 61 channels -> 56
    assert shape.ffn == 56 and _macs(ffn=56) <= 0.75 * _macs() < _macs(ffn=64)
    assert info["macs_before"] == _macs() and info["macs_solved"] == _macs(ffn=56)
    prune_to(m, shape, "l1", example_inputs=torch.randint(0, V, (1, 16)))
    assert count_macs(m, 16) == _macs(ffn=56)
    shape, _ = solve_target(tiny_llama(num_hidden_layers=4), "macs", 0.5, ["layers"], 8, 16)
    assert shape.layers == 1  # the embeddings-free LM head and rotary stay: 2 of 4 layers keep 0.54 of the MACs
    assert _macs(layers=1) <= 0.5 * _macs(layers=4) < _macs(layers=2)


# --------------------------------------------------------------------------------- the prune stage with targets


@pytest.fixture()
def student_dir(tmp_path):
    from dsk_compress.models.source import save_hf_dir

    return save_hf_dir(tiny_llama(), tmp_path / "student")


def _spec(student_dir, prune: dict):
    from dsk_compress.recipes.schema import RecipeSpec

    return RecipeSpec.model_validate(
        {
            "name": "prune-target",
            "teacher": {"hf": str(student_dir)},
            "student": {"hf": str(student_dir)},
            "task": {"name": "code-lm", "seq_len": 16, "eval_sequences": 4},
            "stages": [{"stage": "prune", "steps": 0, "calibration_batches": 2, **prune}],
        }
    )


def test_stage_params_target_progressive_and_reports_mac_reduction(student_dir, tmp_path):
    from dsk_compress.recipes.runner import run_recipe

    rd = run_recipe(_spec(student_dir, {"target": {"params": 0.75}, "iterations": 2, "importance": "activation"}), run_dir=tmp_path / "r")
    m = json.loads((rd / "prune" / "metrics.json").read_text())
    # 128 -> 128 * (48/128) ** 0.5 = 78 -> 72 (rounded to 8) -> 48
    assert [it["structure"]["layers"][0]["ffn"] for it in m["iterations"]] == [72, 48]
    assert m["params_before"] == 115_008 and m["params_after"] == 84_288
    assert m["target"]["kind"] == "params" and m["target"]["solved"]["ffn"] == 48
    assert m["macs_before"] == _macs() and m["macs_after"] == _macs(ffn=48)
    assert m["mac_reduction"] == round(1 - _macs(ffn=48) / _macs(), 4)


def test_stage_latency_target_stops_at_the_first_step_within_budget(student_dir, tmp_path, monkeypatch):
    """The stop rule on a stand-in clock: p50 = FFN width / 10 ms, budget 7 ms, steps of 0.1."""
    import dsk_compress.compress.prune as prune
    from dsk_compress.recipes.runner import run_recipe

    calls = []

    def fake(model, example, workdir, threads=None, runs=20, warmup=3, parity_atol=1e-3):
        ffn = model.model.layers[0].mlp.gate_proj.out_features
        calls.append(ffn)
        return {
            "p50_ms": ffn / 10,
            "p90_ms": ffn / 10,
            "mean_ms": ffn / 10,
            "runs": runs,
            "threads": threads,
            "seq_len": 16,
            "parity_max_abs_diff": 0.0,
            "runtime": "stand-in",
        }

    monkeypatch.setattr(prune, "measure_latency", fake)
    rd = run_recipe(_spec(student_dir, {"target": {"latency_ms": 7.0, "step": 0.1}}), run_dir=tmp_path / "r")
    lat = json.loads((rd / "prune" / "latency.json").read_text())
    # 128 -> 112, 96, 88, 72, 64 channels (ratios 0.1 .. 0.5, rounded down to 8): 6.4 ms is the first <= 7
    assert calls == [128, 112, 96, 88, 72, 64]
    assert [s["ratio"] for s in lat["steps"]] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [s["p50_ms"] for s in lat["steps"]] == [11.2, 9.6, 8.8, 7.2, 6.4]
    assert lat["met"] is True and lat["stopped"].startswith("budget met at step 5")
    m = json.loads((rd / "prune" / "metrics.json").read_text())
    assert m["structure_after"]["layers"][0]["ffn"] == 64 and len(m["iterations"]) == 5


def test_stage_latency_target_measures_each_step_on_this_host(student_dir, tmp_path):
    """Real ONNX export + ONNX Runtime timing; an unreachable budget runs every step to max_ratio, then fails naming the field."""
    from dsk_compress.errors import RecipeError
    from dsk_compress.recipes.runner import run_recipe

    target = {"latency_ms": 1e-6, "step": 0.25, "max_ratio": 0.5, "structures": ["ffn", "heads", "layers"], "runs": 3, "warmup": 1}
    with pytest.raises(RecipeError, match=r"stages.0.target.latency_ms 1e-06 ms is not met on this host even at target.max_ratio 0.5"):
        run_recipe(_spec(student_dir, {"target": target}), run_dir=tmp_path / "r")
    lat = json.loads((tmp_path / "r" / "prune" / "latency.json").read_text())
    assert "this host" in lat["measured_on"] and "not the target device" in lat["measured_on"]
    assert lat["met"] is False and lat["before_p50_ms"] > 0
    # step 1 (0.25): 96 channels, 3 of 4 heads (transformers 5: 2, since hidden_size 64 must be a multiple of the head count),
    # 2 layers; step 2 (0.5): 64 channels, 2 heads, 1 layer
    import transformers

    h1 = 3 if transformers.__version__.startswith("4.") else 2
    assert [(s["ratio"], s["structure"]) for s in lat["steps"]] == [
        (0.25, {"heads": h1, "kv_heads": h1, "ffn": 96, "layers": 2}),
        (0.5, {"heads": 2, "kv_heads": 2, "ffn": 64, "layers": 1}),
    ]
    for s in lat["steps"]:
        assert isinstance(s["p50_ms"], float) and s["p50_ms"] > 0 and s["p90_ms"] >= s["p50_ms"]
        assert s["parity_max_abs_diff"] < 1e-3  # the ONNX candidate that was timed is the pruned model


def test_stage_latency_target_met_before_pruning_prunes_nothing(student_dir, tmp_path):
    from dsk_compress.recipes.runner import run_recipe

    rd = run_recipe(_spec(student_dir, {"target": {"latency_ms": 1e5, "runs": 3, "warmup": 1}}), run_dir=tmp_path / "r")
    m = json.loads((rd / "prune" / "metrics.json").read_text())
    assert m["target"]["met"] is True and m["target"]["steps"] == [] and m["target"]["before_p50_ms"] > 0
    assert m["params_after"] == m["params_before"] == 115_008 and m["mac_reduction"] == 0.0
