"""Hidden-state MSE through learned projections, vocabulary checks, logit-cache refusal, training precision."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from dsk_compress.errors import InvalidArgument, RecipeError, RunError
from dsk_compress.recipes.base import field_error


def _narrow_llama(**kw):
    return tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16, **kw)


# --- hidden-state MSE -------------------------------------------------------------------------------


def test_hidden_mse_is_exactly_zero_for_a_copy_of_the_teacher_with_identity_projection():
    from dsk_compress.compress.distill import HiddenStateMSE, make_kd_loss_fn

    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    hidden = HiddenStateMSE([(0, 0), (1, 1)], 64, 64)
    for p in hidden.proj:
        assert torch.equal(p.weight, torch.eye(64)) and torch.equal(p.bias, torch.zeros(64))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, logs = make_kd_loss_fn(teacher, 2.0, 1.0, hidden=hidden, hidden_weight=0.7)(student, x, 0)
    assert logs["hidden_mse"] == 0.0
    assert logs["kl"] == 0.0
    assert float(loss.detach()) == 0.0  # kd_weight 1: no CE term, KL 0, hidden MSE 0


def test_hidden_mse_matches_hand_computation_and_its_gradient_reaches_the_projections():
    from dsk_compress.compress.distill import HiddenStateMSE, kd_loss, make_kd_loss_fn

    teacher = tiny_llama(num_hidden_layers=3)  # hidden 64
    student = _narrow_llama(num_hidden_layers=3)  # hidden 32
    pairs = [(0, 1), (1, 0)]
    hidden = HiddenStateMSE(pairs, 32, 64, seed=3)
    assert [tuple(p.weight.shape) for p in hidden.proj] == [(64, 32), (64, 32)]
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    w = 0.25
    loss, logs = make_kd_loss_fn(teacher, 2.0, 0.8, hidden=hidden, hidden_weight=w)(student, x, 0)
    loss.backward()

    # by hand, from Hugging Face's own hidden_states (entry i + 1 is the output of decoder layer i; none is the last layer here)
    with torch.no_grad():
        hs = student(input_ids=x, use_cache=False, output_hidden_states=True)
        ht = teacher(input_ids=x, use_cache=False, output_hidden_states=True)
    terms, grads = [], []
    for (s, t), proj in zip(pairs, hidden.proj):
        a, b = hs.hidden_states[s + 1].double(), ht.hidden_states[t + 1].double()
        err = a @ proj.weight.detach().double().T + proj.bias.detach().double() - b
        terms.append((err**2).mean())
        # d loss / d W = w / n_pairs * 2 / numel * err^T a
        grads.append(w / len(pairs) * 2 / err.numel() * torch.einsum("bto,bti->oi", err, a))
    hand = sum(terms) / len(terms)
    assert logs["hidden_mse"] == pytest.approx(float(hand), rel=1e-6)
    ref_kd = kd_loss(hs.logits, ht.logits, x, 2.0, 0.8)[0]
    assert float(loss.detach()) == pytest.approx(float(ref_kd) + w * float(hand), rel=1e-6)
    for proj, g in zip(hidden.proj, grads):
        assert float(proj.weight.grad.abs().max()) > 0
        torch.testing.assert_close(proj.weight.grad.double(), g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))


def test_hidden_mse_refuses_the_logit_cache_naming_the_field(tmp_path):
    from dsk_compress.compress.distill import HiddenStateMSE, make_kd_loss_fn
    from dsk_compress.compress.logit_cache import TeacherLogitCache
    from dsk_compress.recipes import load_recipe
    from dsk_compress.recipes.stages.common import check_kd_settings

    teacher = tiny_llama(num_hidden_layers=1)
    cache = TeacherLogitCache(tmp_path / "c", teacher, "task", k=8)
    with pytest.raises(InvalidArgument, match="hidden_weight"):
        make_kd_loss_fn(teacher, 2.0, 0.8, cache=cache, hidden=HiddenStateMSE([(0, 0)], 64, 64), hidden_weight=1.0)
    spec = load_recipe("quant-prune-distill", ["logit_cache.enabled=true", "stages.0.hidden_mse=0.5"])
    with pytest.raises(RecipeError, match=r"stages\.0\.hidden_mse") as e:
        check_kd_settings(SimpleNamespace(spec=spec), spec.stages[0], "distill")
    assert "logit_cache.enabled: false" in e.value.hint


def test_hidden_pairs_default_to_the_layers_the_student_was_cut_from_and_are_range_checked():
    from dsk_compress.recipes import load_recipe
    from dsk_compress.recipes.stages.distill import DistillStage

    teacher, student = tiny_llama(num_hidden_layers=4), tiny_llama(num_hidden_layers=2)
    spec = load_recipe("quant-prune-distill", ["stages.0.hidden_mse=0.5"])
    ctx = SimpleNamespace(spec=spec)
    stage = DistillStage(spec.stages[0])
    assert stage._hidden_pairs(ctx, student, teacher, {"layers": [1, 3]}) == [(0, 1), (1, 3)]
    with pytest.raises(RecipeError, match=r"stages\.0\.hidden_pairs is needed"):
        stage._hidden_pairs(ctx, student, teacher, {})  # a student not cut from the teacher
    spec = load_recipe("quant-prune-distill", ["stages.0.hidden_mse=0.5", "stages.0.hidden_pairs=[[0, 0], [2, 3]]"])
    assert spec.stages[0].hidden_pairs == [(0, 0), (2, 3)]
    stage = DistillStage(spec.stages[0])
    with pytest.raises(InvalidArgument, match=r"hidden_pairs: pair \[2, 3\] is out of range") as e:
        stage._hidden_pairs(SimpleNamespace(spec=spec), student, teacher, {"layers": [1, 3]})
    assert field_error(e.value, stage, 0).message.startswith("stages.0.hidden_pairs: pair [2, 3] is out of range")  # as the run says it
    off = load_recipe("quant-prune-distill")
    assert off.stages[0].hidden_mse == 0.0 and DistillStage(off.stages[0])._hidden_pairs(ctx, student, teacher, {}) is None


def test_hidden_projection_trains_jointly_and_resume_is_exact(tmp_path):
    from dsk_compress.compress.distill import HiddenStateMSE, make_kd_loss_fn
    from dsk_compress.compress.trainer import TrainConfig, train

    teacher = tiny_llama(num_hidden_layers=2)

    def batch(i, bs):
        return torch.randint(0, 256, (bs, 16), generator=torch.Generator().manual_seed(i))

    cfg = TrainConfig(steps=5, batch_size=2, lr=1e-2, warmup=1, ckpt_every=2)

    def run(ckpt, stop_at=None):
        student = _narrow_llama()
        hidden = HiddenStateMSE([(0, 0), (1, 1)], 32, 64)
        fn = make_kd_loss_fn(teacher, 2.0, 0.5, hidden=hidden, hidden_weight=1.0)
        calls = {"n": 0}

        def loss_fn(m, x, i):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            return fn(m, x, i)

        res = train(student, loss_fn, batch, cfg, ckpt_dir=ckpt, aux=hidden)
        return student, hidden, res

    w0 = HiddenStateMSE([(0, 0), (1, 1)], 32, 64).proj[0].weight.clone()
    a_student, a_hidden, a_res = run(tmp_path / "a")
    assert not torch.equal(a_hidden.proj[0].weight, w0)  # the projection was optimised
    assert a_res.final_logs["hidden_mse"] > 0
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=4)  # dies in step 4, after the step-2 checkpoint
    b_student, b_hidden, b_res = run(tmp_path / "b")
    assert b_res.resumed_from == 2
    for (n, p), q in zip(a_student.named_parameters(), b_student.parameters()):
        assert torch.equal(p, q), n
    for (n, p), q in zip(a_hidden.named_parameters(), b_hidden.parameters()):
        assert torch.equal(p, q), n
    # the projections are checkpointed beside the student, never inside it
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "a" / "aux.safetensors")) == ["proj.0.bias", "proj.0.weight", "proj.1.bias", "proj.1.weight"]
    assert sorted(load_file(tmp_path / "a" / "model.safetensors")) == sorted(a_student.state_dict())


# --- vocabulary checks --------------------------------------------------------------------------------


def _word_tokenizer(words: list[str], eos: str = "</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos)


def test_check_vocab_refuses_a_student_with_another_vocabulary_or_special_ids():
    from dsk_compress.compress.distill import check_vocab

    t = tiny_llama().config
    check_vocab(t, tiny_llama().config)  # same vocabulary: fine
    with pytest.raises(InvalidArgument, match=r"student vocab_size \(300\) differs from the teacher's vocab_size \(256\)"):
        check_vocab(t, tiny_llama(vocab_size=300).config)
    t2 = tiny_llama(eos_token_id=2).config
    check_vocab(t2, tiny_llama().config)  # the student does not set eos: nothing to compare
    with pytest.raises(InvalidArgument, match=r"student eos_token_id \(3\) differs from the teacher's eos_token_id \(2\)"):
        check_vocab(t2, tiny_llama(eos_token_id=3).config)
    check_vocab(tiny_llama(eos_token_id=[2, 7]).config, tiny_llama(eos_token_id=7).config)  # one of several eos ids


def test_check_vocab_refuses_a_task_tokenizer_that_is_not_the_teachers(tmp_path):
    from dsk_compress.compress.distill import check_vocab
    from dsk_compress.recipes.stages.distill import DistillStage

    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(30)]
    teacher_tok = _word_tokenizer(words)
    same = _word_tokenizer(words)
    swapped = _word_tokenizer(words[:2] + words[3:] + words[2:3])  # same size and specials, other ids
    t = tiny_llama(vocab_size=32, eos_token_id=1).config
    check_vocab(t, task_tokenizer=same, teacher_tokenizer=teacher_tok)
    with pytest.raises(InvalidArgument, match="task_tokenizer maps tokens to other ids"):
        check_vocab(t, task_tokenizer=swapped, teacher_tokenizer=teacher_tok)
    with pytest.raises(InvalidArgument, match=r"task_tokenizer has 40 tokens but the teacher's vocab_size is 32"):
        check_vocab(t, task_tokenizer=_word_tokenizer(words + [f"x{i}" for i in range(8)]))
    other_eos = _word_tokenizer(["<unk>", "w0", "</s>"] + words[3:])
    with pytest.raises(InvalidArgument, match=r"task_tokenizer eos_token_id is 2 but the teacher's config has eos_token_id 1"):
        check_vocab(t, task_tokenizer=other_eos)
    # the distill stage compares the task tokenizer with the one in the teacher's directory
    teacher_tok.save_pretrained(tmp_path / "teacher")
    ctx = SimpleNamespace(
        task=SimpleNamespace(tok=swapped, vocab_size=len(swapped)),
        spec=SimpleNamespace(teacher=SimpleNamespace(hf=str(tmp_path / "teacher")), task=SimpleNamespace(tokenizer=str(tmp_path / "mine"))),
    )
    with pytest.raises(InvalidArgument, match="task_tokenizer maps tokens to other ids") as e:
        DistillStage(None)._check_task_vocab(ctx, SimpleNamespace(config=t))
    assert "teacher's own tokenizer" in e.value.hint
    ctx.task.tok = same
    DistillStage(None)._check_task_vocab(ctx, SimpleNamespace(config=t))


def test_logit_cache_of_another_teacher_is_refused_naming_the_file_and_the_fix(tmp_path):
    from dsk_compress.compress.logit_cache import TeacherLogitCache

    TeacherLogitCache(tmp_path / "c", tiny_llama(num_hidden_layers=1), "task", k=8)
    other = tiny_llama(num_hidden_layers=1)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    with pytest.raises(RunError, match="another teacher") as e:
        TeacherLogitCache(tmp_path / "c", other, "task", k=8)
    assert str(tmp_path / "c" / "cache.json") in e.value.message
    assert f"delete {tmp_path / 'c'}" in e.value.hint and "--resume" in e.value.hint
    with pytest.raises(RunError, match=r"other settings \(k 8 -> 16\)"):
        TeacherLogitCache(tmp_path / "c", tiny_llama(num_hidden_layers=1), "task", k=16)


# --- precision ----------------------------------------------------------------------------------------


def _lm_setup():
    from dsk_compress.models.zoo import lm_loss

    seen = []

    def loss_fn(m, x, i):
        logits = m(input_ids=x, use_cache=False).logits
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype))
        return lm_loss(logits.float(), x), {}

    def batch(i, bs):
        return torch.randint(0, 256, (bs, 16), generator=torch.Generator().manual_seed(i))

    return loss_fn, batch, seen


def test_precision_bf16_autocasts_on_cpu_and_auto_stays_fp32():
    from dsk_compress.compress.trainer import TrainConfig, train

    loss_fn, batch, seen = _lm_setup()
    res = train(_narrow_llama(), loss_fn, batch, TrainConfig(steps=2, batch_size=2, warmup=1, precision="bf16"))
    assert res.precision == "bf16" and seen == [(True, torch.bfloat16)] * 2
    seen.clear()
    res = train(_narrow_llama(), loss_fn, batch, TrainConfig(steps=1, batch_size=2, warmup=1))
    assert res.precision == "fp32" and seen == [(False, torch.float32)]


def test_precision_fp16_on_cpu_is_refused_naming_the_field():
    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.recipes import load_recipe

    loss_fn, batch, seen = _lm_setup()
    with pytest.raises(InvalidArgument, match="precision fp16 needs a CUDA device") as e:
        train(_narrow_llama(), loss_fn, batch, TrainConfig(steps=1, batch_size=2, precision="fp16"))
    assert "bf16 or fp32" in e.value.hint and seen == []  # refused before any step
    with pytest.raises(RecipeError, match="precision"):
        load_recipe("quant-prune-distill", ["stages.0.precision=fp8"])
    assert load_recipe("quant-prune-distill", ["stages.2.precision=bf16"]).stages[2].precision == "bf16"


def test_grad_scaler_skips_inf_steps_and_its_state_resumes_exactly(tmp_path, monkeypatch):
    """The fp16 scaler path of the loop, run on CPU (fp32 compute, a real enabled torch.amp.GradScaler)."""
    from dsk_compress.compress import trainer
    from dsk_compress.models.zoo import lm_loss

    monkeypatch.setattr(trainer, "resolve_precision", lambda p, d: (None, True, "fp16"))

    def batch(i, bs):
        return torch.randint(0, 256, (bs, 16), generator=torch.Generator().manual_seed(i))

    cfg = trainer.TrainConfig(steps=6, batch_size=2, lr=1e-2, warmup=1, ckpt_every=3)

    def run(ckpt, stop_at=None):
        model = _narrow_llama()
        snaps, calls = [], {"n": 0}

        def loss_fn(m, x, i):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            snaps.append(m.lm_head.weight.detach().clone())
            loss = lm_loss(m(input_ids=x, use_cache=False).logits, x)
            return (loss * float("inf") if i == 1 else loss), {}  # batch 1 overflows: its step must be skipped

        return model, trainer.train(model, loss_fn, batch, cfg, ckpt_dir=ckpt), snaps

    model, res, snaps = run(tmp_path / "a")
    assert res.skipped_steps == 1
    assert torch.equal(snaps[1], snaps[2]) and not torch.equal(snaps[0], snaps[1]) and not torch.equal(snaps[2], snaps[3])
    blob = torch.load(tmp_path / "a" / "optim.pt", weights_only=True)
    assert blob["scaler"]["scale"] == 2.0**16 / 2 and blob["scaler"]["_growth_tracker"] == 4  # backed off once, 4 good steps since
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=5)  # dies in step 5, after the step-3 checkpoint
    assert torch.load(tmp_path / "b" / "optim.pt", weights_only=True)["scaler"]["scale"] == 2.0**15
    model_b, res_b, _ = run(tmp_path / "b")
    assert res_b.resumed_from == 3 and res_b.skipped_steps == 1
    assert torch.load(tmp_path / "b" / "optim.pt", weights_only=True)["scaler"] == blob["scaler"]
    for (n, p), q in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs CUDA")
def test_precision_fp16_on_cuda_uses_the_grad_scaler_and_resumes(tmp_path):
    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.models.zoo import lm_loss

    def loss_fn(m, x, i):
        logits = m(input_ids=x, use_cache=False).logits
        assert logits.dtype == torch.float16
        return lm_loss(logits.float(), x), {}

    def batch(i, bs):
        return torch.randint(0, 256, (bs, 16), generator=torch.Generator().manual_seed(i))

    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup=1, ckpt_every=2, precision="fp16")
    a = _narrow_llama().cuda()
    res = train(a, loss_fn, batch, cfg, ckpt_dir=tmp_path / "a")
    assert res.precision == "fp16" and res.final_loss == res.final_loss
    scaler = torch.load(tmp_path / "a" / "optim.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    b = _narrow_llama().cuda()
    res_b = train(b, loss_fn, batch, cfg, ckpt_dir=tmp_path / "a")  # complete checkpoint: nothing left to do
    assert res_b.resumed_from == 4
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_distill_stage_trains_hidden_projections_on_the_layers_the_student_was_cut_from(tmp_path):
    from conftest import tiny_mixtral_config
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    from dsk_compress.recipes.runner import run_recipe
    from dsk_compress.recipes.schema import RecipeSpec

    torch.manual_seed(0)
    MixtralForCausalLM(tiny_mixtral_config()).save_pretrained(tmp_path / "teacher", safe_serialization=True)
    spec = RecipeSpec.model_validate(
        {
            "name": "hidden",
            "teacher": {"hf": str(tmp_path / "teacher")},
            "student": {"from_teacher": {"layers": [0, 2], "ffn_init": "top", "calibration_batches": 1}},
            "task": {"name": "code-lm", "seq_len": 32, "eval_sequences": 4},
            "stages": [{"stage": "distill", "steps": 3, "batch_size": 2, "hidden_mse": 0.5, "baselines": ["nokd"]}],
            "keep_checkpoints": True,  # the checkpoint's aux.safetensors is read below
        }
    )
    rd = run_recipe(spec, run_dir=tmp_path / "run")
    m = json.loads((rd / "distill" / "metrics.json").read_text())
    kd = m["train"]["kd"]
    assert kd["teacher"] == "online" and kd["hidden_mse"] == 0.5 and kd["hidden_pairs"] == [[0, 0], [1, 2]]
    assert kd["final_hidden_mse"] > 0 and m["train"]["precision"] == "fp32" and m["train"]["world_size"] == 1
    assert sorted(load_file(rd / "distill" / "checkpoint" / "aux.safetensors")) == [
        "proj.0.bias",
        "proj.0.weight",
        "proj.1.bias",
        "proj.1.weight",
    ]
    assert not any(k.startswith("proj") for k in load_file(rd / "distill" / "model" / "model.safetensors"))
    assert "hidden_mse" not in m["baseline_nokd"]["train"]["kd"] and m["baseline_nokd"]["train"]["kd"]["teacher"] == "none"
