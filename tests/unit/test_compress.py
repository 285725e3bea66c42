"""Numbers, not smoke: MoE dense routing, student init, KD loss, pruning counts, trainer resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import kept_rows, tiny_llama, tiny_mixtral_config


@pytest.fixture(scope="module")
def task():
    from dsk_compress.tasks.code_lm import CodeLMTask

    return CodeLMTask(seq_len=32, eval_sequences=8)


def test_code_lm_split_is_deterministic_and_disjoint(task):
    from dsk_compress.tasks.code_lm import is_validation, stdlib_files

    files = stdlib_files()
    val = [r for r, _ in files if is_validation(r, 5)]
    assert 0.02 < len(val) / len(files) < 0.09
    assert [r for r, _ in files if is_validation(r, 5)] == val
    assert task.train.dtype == np.uint8 and len(task.train) > 10 * len(task.val) > 0
    assert torch.equal(task.train_batch(7, 4), task.train_batch(7, 4))
    assert not torch.equal(task.train_batch(7, 4), task.train_batch(8, 4))


def test_code_lm_metrics_match_hand_computation(task):
    # a predictor that puts all mass on the true next byte scores 100% and ~0 bits/byte
    def oracle(x):
        logits = np.full(x.shape + (256,), -50.0, dtype=np.float32)
        np.put_along_axis(logits[:, :-1], x[:, 1:, None], 50.0, axis=-1)
        return logits

    m = task.evaluate(oracle)
    assert m.accuracy == pytest.approx(100.0)
    assert m.extra["bits_per_byte"] < 1e-6
    uniform = task.evaluate(lambda x: np.zeros(x.shape + (256,), np.float32))
    assert uniform.extra["bits_per_byte"] == pytest.approx(8.0, abs=1e-9)


def test_densify_moe_equals_sparse_routing():
    from transformers import MixtralForCausalLM

    from dsk_compress.compress.moe import densify_moe

    torch.manual_seed(0)
    m = MixtralForCausalLM(tiny_mixtral_config()).eval()
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = m(input_ids=x).logits
        densify_moe(m)
        got = m(input_ids=x).logits
    assert torch.allclose(ref, got, atol=1e-5, rtol=0)


def test_router_frequencies_sum_to_one_per_layer():
    from transformers import MixtralForCausalLM

    from dsk_compress.compress.moe import router_frequencies

    torch.manual_seed(0)
    m = MixtralForCausalLM(tiny_mixtral_config()).eval()
    f = router_frequencies(m, [torch.randint(0, 256, (2, 16)) for _ in range(2)])
    assert len(f) == 3
    for v in f.values():
        assert v.shape == (4,) and float(v.sum()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("init", ["merge", "top", "random"])
def test_build_student_copies_teacher_layers(init):
    from transformers import MixtralForCausalLM

    from dsk_compress.compress.student import build_student

    torch.manual_seed(0)
    t = MixtralForCausalLM(tiny_mixtral_config()).eval()
    s, info = build_student(t, layers=[0, 2], ffn_init=init, calibration=[torch.randint(0, 256, (2, 16))])
    assert s.config.num_hidden_layers == 2 and info["layers"] == [0, 2]
    assert torch.equal(s.model.layers[1].self_attn.q_proj.weight, t.model.layers[2].self_attn.q_proj.weight)
    assert torch.equal(s.lm_head.weight, t.lm_head.weight)
    from dsk_compress.compress.moe import Experts, family, moe_blocks

    name, blk = moe_blocks(t)[2]
    ex = Experts(blk, family(t.config))
    experts = [ex.expert(e) for e in range(len(ex))]
    if init == "top":
        top = int(torch.tensor(info["router_frequencies"][name]).argmax())
        assert torch.equal(s.model.layers[1].mlp.gate_proj.weight, experts[top].gate)
    elif init == "merge":
        # every student channel is one expert channel, its down projection scaled by that expert's frequency
        f = info["router_frequencies"][name]
        gate = torch.cat([e.gate for e in experts])
        down = torch.cat([fi * e.down for fi, e in zip(f, experts)], dim=1)
        sm = s.model.layers[1].mlp
        rows = [int((gate == r).all(1).nonzero()[0]) for r in sm.gate_proj.weight]
        assert len(set(rows)) == sm.gate_proj.out_features == 96
        assert torch.allclose(sm.down_proj.weight, down[:, rows], rtol=2e-3, atol=1e-7)  # info rounds f to 4 digits
        norms = down.norm(dim=0)
        assert norms[rows].min() >= norms.sort(descending=True).values[95] - 1e-6


def test_build_student_rejects_out_of_range_layers():
    from transformers import MixtralForCausalLM

    from dsk_compress.compress.student import build_student
    from dsk_compress.errors import InvalidArgument

    t = MixtralForCausalLM(tiny_mixtral_config()).eval()
    with pytest.raises(InvalidArgument, match="out of range"):
        build_student(t, layers=[0, 7], ffn_init="random")


def test_kd_loss_is_zero_kl_for_identical_logits_and_matches_formula():
    from dsk_compress.compress.distill import kd_loss

    torch.manual_seed(0)
    s = torch.randn(2, 5, 11)
    x = torch.randint(0, 11, (2, 5))
    loss, logs = kd_loss(s, s.clone(), x, temperature=2.0, kd_weight=1.0)
    assert logs["kl"] == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 5, 11)
    loss, logs = kd_loss(s, t, x, temperature=3.0, kd_weight=0.5)
    ps = torch.log_softmax(s[:, :-1] / 3, -1)
    pt = torch.softmax(t[:, :-1] / 3, -1)
    kl = (pt * (pt.log() - ps)).sum(-1).mean() * 9
    ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), x[:, 1:].reshape(-1))
    assert float(loss) == pytest.approx(float(0.5 * kl + 0.5 * ce), rel=1e-5)


def test_reverse_kl_term_matches_formula():
    from dsk_compress.compress.distill import kd_loss

    torch.manual_seed(1)
    s, t = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    x = torch.randint(0, 9, (2, 6))
    fwd, _ = kd_loss(s, t, x, temperature=1.0, kd_weight=1.0)
    both, logs = kd_loss(s, t, x, temperature=1.0, kd_weight=1.0, reverse_kl=0.5)
    ps, pt = torch.softmax(s[:, :-1], -1), torch.softmax(t[:, :-1], -1)
    rkl = (ps * (ps.log() - pt.log())).sum(-1).mean()
    assert logs["reverse_kl"] == pytest.approx(float(rkl), rel=1e-5)
    assert float(both) == pytest.approx(float(fwd + 0.5 * rkl), rel=1e-5)


def test_prune_ffn_exact_counts_and_equals_zeroed_model():
    from dsk_compress.compress.prune import prune_step

    m = tiny_llama(intermediate_size=128)
    ref = tiny_llama(intermediate_size=128)
    x = torch.randint(0, 256, (1, 16))
    after = prune_step(m, x, ffn_ratio=0.5, head_ratio=0.0, importance="l2", round_to=8)
    assert [layer["ffn"] for layer in after["layers"]] == [64, 64]
    assert m.config.intermediate_size == 64
    with torch.no_grad():
        for lo, lp in zip(ref.model.layers, m.model.layers):
            keep = kept_rows(lo.mlp.gate_proj.weight, lp.mlp.gate_proj.weight)
            mask = torch.zeros(128, dtype=torch.bool)
            mask[keep] = True
            lo.mlp.down_proj.weight[:, ~mask] = 0  # zeroed channels contribute nothing
        y = torch.randint(0, 256, (2, 20))
        assert torch.allclose(ref(input_ids=y).logits, m(input_ids=y).logits, atol=1e-5)


def test_prune_heads_exact_counts_and_reload(tmp_path):
    from dsk_compress.compress.prune import prune_step
    from dsk_compress.models.source import load_hf_dir, save_hf_dir

    m = tiny_llama()
    x = torch.randint(0, 256, (1, 16))
    after = prune_step(m, x, ffn_ratio=0.25, head_ratio=0.5, importance="l1", round_to=8)
    assert [(layer["heads"], layer["ffn"]) for layer in after["layers"]] == [(2, 96), (2, 96)]
    save_hf_dir(m, tmp_path / "p")
    r = load_hf_dir(tmp_path / "p")
    assert r.config.num_attention_heads == 2 and r.config.intermediate_size == 96
    y = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.allclose(r(input_ids=y).logits, m(input_ids=y).logits, atol=0)


def test_prune_rejects_ratio_leaving_no_heads():
    from dsk_compress.compress.prune import check_prunable
    from dsk_compress.errors import InvalidArgument

    m = tiny_llama()
    with pytest.raises(InvalidArgument, match="leaves no attention heads"):
        check_prunable(m.config, 0.0, 0.9, 8)


def test_trainer_resume_is_exact(tmp_path):
    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.models.zoo import lm_loss

    def loss_fn(m, x, step):
        return lm_loss(m(input_ids=x, use_cache=False).logits, x), {}

    def batch(step, bs):
        g = torch.Generator().manual_seed(step)
        return torch.randint(0, 256, (bs, 16), generator=g)

    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-2, warmup=2, ckpt_every=3)
    a = tiny_llama()
    train(a, loss_fn, batch, cfg, ckpt_dir=tmp_path / "a")
    b = tiny_llama()
    train(b, loss_fn, batch, cfg, ckpt_dir=tmp_path / "b")
    # interrupt a fresh run during step 4 (after the step-3 checkpoint), then resume to 6
    c = tiny_llama()
    calls = {"n": 0}

    def stopping_loss(m, x, step):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return loss_fn(m, x, step)

    with pytest.raises(KeyboardInterrupt):
        train(c, stopping_loss, batch, cfg, ckpt_dir=tmp_path / "c")
    d = tiny_llama()
    res = train(d, loss_fn, batch, cfg, ckpt_dir=tmp_path / "c")
    assert res.resumed_from == 3
    for (n, p), q in zip(a.named_parameters(), d.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_logit_cache_hits_and_matches_online_teacher(tmp_path):
    from dsk_compress.compress.distill import make_kd_loss_fn
    from dsk_compress.compress.logit_cache import TeacherLogitCache

    teacher = tiny_llama(num_hidden_layers=1)
    student = tiny_llama()
    cache = TeacherLogitCache(tmp_path / "c", teacher, "task", k=256)  # k = vocab: exact
    x = torch.randint(0, 256, (2, 12))
    online = make_kd_loss_fn(teacher, 2.0, 1.0)(student, x, 0)[0]
    first = make_kd_loss_fn(teacher, 2.0, 1.0, cache=cache)(student, x, 0)[0]
    again = make_kd_loss_fn(teacher, 2.0, 1.0, cache=cache)(student, x, 0)[0]
    assert (cache.misses, cache.hits) == (1, 1)
    assert float(first) == pytest.approx(float(online), rel=1e-3)  # fp16 storage of the values
    assert float(again) == float(first)


def test_logit_cache_refuses_another_teacher(tmp_path):
    from dsk_compress.compress.logit_cache import TeacherLogitCache
    from dsk_compress.errors import RunError

    TeacherLogitCache(tmp_path / "c", tiny_llama(num_hidden_layers=1), "task", k=8)
    other = tiny_llama(num_hidden_layers=1)
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    with pytest.raises(RunError, match="another teacher"):
        TeacherLogitCache(tmp_path / "c", other, "task", k=8)


def test_trainer_early_stops_on_plateau_and_resume_keeps_it_stopped(tmp_path):
    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.models.zoo import lm_loss

    def loss_fn(m, x, i):
        return lm_loss(m(input_ids=x, use_cache=False).logits, x), {}

    def batch(i, bs):
        return torch.randint(0, 256, (bs, 8), generator=torch.Generator().manual_seed(i))

    scores = iter([50.0, 51.0, 50.5, 50.9, 60.0, 61.0])
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-3, warmup=1, eval_every=1, early_stop_patience=2)
    res = train(tiny_llama(), loss_fn, batch, cfg, ckpt_dir=tmp_path / "c", evaluate=lambda m: {"accuracy": next(scores)})
    assert res.stopped_early and res.steps == 4 and len(res.history) == 4
    again = train(tiny_llama(), loss_fn, batch, cfg, ckpt_dir=tmp_path / "c", evaluate=lambda m: {"accuracy": 99.0})
    assert again.stopped_early and again.steps == 4 and len(again.history) == 4
