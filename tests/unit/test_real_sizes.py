"""Real-size behaviour on tiny models: the teacher's dtype, checkpoint cleanup, hashes computed once, the memory
estimate of every stage (export included) and its refusal of a teacher that cannot fit, with a fix that does."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_llama

from dsk_compress.errors import RecipeError, RunError
from dsk_compress.models.hf import checkpoint_dtype
from dsk_compress.models.source import load_model_source


def _saved(tmp_path, dtype):
    m = tiny_llama().to(dtype)
    m.save_pretrained(tmp_path / "m", safe_serialization=True)
    return tmp_path / "m"


@pytest.mark.parametrize(
    "stored, want, loaded",
    [
        (torch.bfloat16, "auto", torch.bfloat16),
        (torch.bfloat16, "fp32", torch.float32),
        (torch.float16, "auto", torch.float32),
        (torch.float32, "bf16", torch.bfloat16),
        (torch.float32, "auto", torch.float32),
    ],
)
def test_teacher_loads_in_the_checkpoint_dtype_when_auto(tmp_path, stored, want, loaded):
    d = _saved(tmp_path, stored)
    assert checkpoint_dtype(d) == {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[stored]
    m = load_model_source({"hf": str(d), "dtype": want})
    assert {p.dtype for p in m.parameters()} == {loaded}


def test_released_teacher_reloads_on_a_logit_cache_miss(tmp_path):
    from dsk_compress.compress.logit_cache import TeacherLogitCache

    t = tiny_llama().eval()
    loads = []
    cache = TeacherLogitCache(tmp_path / "c", t, "task", k=4, loader=lambda: loads.append(1) or t)
    x = torch.randint(0, 256, (1, 8))
    v0, i0 = cache.get(0, x)
    cache.teacher = None  # what RunContext.release_teacher does
    v1, i1 = cache.get(0, x)  # a hit: nothing loaded
    assert loads == [] and torch.equal(i0, i1)
    cache.get(1, x)  # a miss: the teacher comes back
    assert loads == [1]


def test_finished_stage_checkpoints_are_removed(tmp_path):
    from dsk_compress.compress.trainer import remove_checkpoints

    ck = tmp_path / "prune" / "step1" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text("{}")
    (ck / "optim.pt").write_bytes(b"x" * 1000)
    (ck / "model.safetensors").write_bytes(b"y" * 500)
    keep = tmp_path / "prune" / "model"
    keep.mkdir()
    (keep / "state.json").write_text("{}")  # no optim.pt: not a training checkpoint
    assert remove_checkpoints(tmp_path / "prune") == 1502
    assert not ck.exists() and (keep / "state.json").is_file()


def test_recorded_files_are_trusted_by_size_and_mtime_and_rehashed_when_mtime_changes(tmp_path):
    from dsk_compress.integrity import record_files, verify_stage

    (tmp_path / "s").mkdir()
    f = tmp_path / "s" / "w.bin"
    f.write_bytes(b"a" * 4096)
    entry = {"stage": "s", "files": record_files(tmp_path, "s")}
    assert entry["files"]["s/w.bin"]["mtime_ns"] == f.stat().st_mtime_ns
    st = f.stat()
    f.write_bytes(b"b" * 4096)  # same size, other bytes
    with pytest.raises(RunError, match="sha256 differs"):
        verify_stage(tmp_path, {}, entry)
    # the trade-off: a same-size edit whose mtime is put back is trusted, unless asked for a full check
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    verify_stage(tmp_path, {}, entry)
    with pytest.raises(RunError, match="sha256 differs"):
        verify_stage(tmp_path, {}, entry, full=True)
    f.write_bytes(b"a" * 4095)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(RunError, match="4,095 bytes"):  # a size change is always caught
        verify_stage(tmp_path, {}, entry)


MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN3_MOE_1B = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def _spec(tmp_path, cfg, **extra):
    from dsk_compress.recipes.schema import RecipeSpec

    d = tmp_path / "teacher"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return RecipeSpec(
        name="big",
        teacher={"hf": str(d)},
        student={"from_teacher": {"keep_every": 4, "intermediate_size": 4096}},
        stages=[{"stage": "distill", "steps": 1, "batch_size": 1}, {"stage": "export"}],
        **extra,
    )


def test_mixtral_8x7b_is_refused_with_a_fix_that_fits_not_a_smaller_batch(tmp_path, monkeypatch):
    from dsk_compress.recipes import preflight as pf

    monkeypatch.setattr(pf, "machine_memory", lambda: 24 * pf.GIB)
    monkeypatch.setattr(pf, "task_vocab", lambda spec: 32000)  # as a text-lm task with the teacher's tokenizer
    with pytest.raises(RecipeError) as e:
        pf.preflight(_spec(tmp_path, MIXTRAL_8X7B))
    hint = e.value.hint
    assert "logit_cache" in hint and "GPU" in hint and "batch_size" not in hint, hint
    assert "teacher weights (bf16) 87.0 GiB" in e.value.message  # config.json's torch_dtype: no weights at --dry-run


def test_export_stage_is_estimated_and_auto_measures_a_big_teacher_in_torch(tmp_path):
    from dsk_compress.recipes import preflight as pf

    spec = _spec(tmp_path, QWEN3_MOE_1B, logit_cache={"enabled": True})
    how, why = pf.teacher_export_plan(spec, memory=24 * pf.GIB)
    assert how == "torch" and "GiB" in why  # 1.16B params: ~14 GiB fp32 export, more than half of 24 GiB
    assert pf.teacher_export_plan(spec, memory=64 * pf.GIB)[0] == "onnx"
    est = pf.estimate_memory(spec, pf._shape(QWEN3_MOE_1B), pf._student_shape(spec, pf._shape(QWEN3_MOE_1B), None))
    by_stage = {s["stage"]: s["bytes"] for s in est["stages"]}
    assert set(by_stage) == {"distill", "export"}
    # the export of the student cut (3 of 12 layers, FFN 4096, 32k vocabulary) is modelled from the measured torch.onnx factor
    ps = est["student_params"]
    assert by_stage["export"] >= pf.TORCH_ONNX_EXPORT_PEAK * 4 * ps


def test_bundle_whose_runtime_peak_passes_the_device_memory_is_refused_with_the_fix(tmp_path):
    from dsk_compress.devices import load_device
    from dsk_compress.export.bundle import check_fits_device, runtime_peak_bytes

    copies = {}
    for name, size in (("model.onnx", 1_200_000_000), ("model.fused.onnx", 2_200_000_000), ("model.kv.onnx", 500_000_000)):
        with open(tmp_path / name, "wb") as f:  # sparse: only the sizes matter
            f.truncate(size)
        copies[name] = tmp_path / name
    # run.py holds one session at a time: the largest graph's (int8 weights prepacked beside the stored ones: 1.65x),
    # one evaluation batch's logits (float32) with scoring's three copies, the interpreter
    logits = 4 * 256 * 32_000
    assert runtime_peak_bytes(copies, "int8", logits) == int(1.65 * 2_200_000_000 + 16 * logits + (64 << 20))
    assert runtime_peak_bytes(copies, "fp32", logits, "float64") == int(2_200_000_000 + 28 * logits + (64 << 20))
    check_fits_device(copies, load_device("rpi5"), "final-int8", "int8", logits)  # 3.9 GiB of 8 GB
    with pytest.raises(RunError, match="rpi4 bundle of 'final-int8' needs about 3.9 GiB") as e:
        check_fits_device(copies, load_device("rpi4"), "final-int8", "int8", logits)  # more than 80% of 4 GB
    assert "int8" in e.value.hint and "memory_gb" in e.value.hint
