"""An MoE student end to end: expert pruning with KD recovery, QAT, export (dense routing) and bench."""

from __future__ import annotations

import json

import pytest

from dsk_compress import run_recipe
from dsk_compress.errors import RecipeError


def _recipe(tmp_path, moe_dir, prune: dict, extra_stages=()):
    import yaml

    data = {
        "name": "moe-student",
        "teacher": {"hf": str(moe_dir)},
        "student": {"hf": str(moe_dir)},
        "task": {"name": "code-lm", "seq_len": 64, "eval_sequences": 16},
        "stages": [{"stage": "prune", "steps": 5, "batch_size": 8, "calibration_batches": 2, **prune}, *extra_stages],
    }
    p = tmp_path / "moe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tiny_moe_dir):
    d = tmp_path_factory.mktemp("moe-student")
    stages = [
        {"stage": "qat", "steps": 5, "batch_size": 8, "observer_steps": 2},
        {"stage": "export"},
        {"stage": "bench", "runs": 3, "warmup": 1},
    ]
    p = _recipe(d, tiny_moe_dir, {"expert_ratio": 0.5, "iterations": 2, "baselines": ["oneshot"]}, stages)
    return run_recipe(str(p), out=d / "runs")


def test_experts_are_pruned_progressively_and_saved_as_a_smaller_mixtral(moe_run):
    from dsk_compress.compress.moe import expert_structure
    from dsk_compress.models.source import load_hf_dir

    m = json.loads((moe_run / "prune" / "metrics.json").read_text())
    assert m["structure_before"]["experts"] == [4, 4, 4]
    assert [it["structure"]["experts"] for it in m["iterations"]] == [[3, 3, 3], [2, 2, 2]]
    assert m["structure_after"]["experts"] == [2, 2, 2]
    assert m["params_after"] < m["params_before"]
    assert all(it["train"]["steps"] == 5 for it in m["iterations"])
    model = load_hf_dir(moe_run / "prune" / "model")
    assert model.config.num_local_experts == 2 and expert_structure(model)["experts"] == [2, 2, 2]
    one = m["baseline_oneshot"]["iterations"]
    assert len(one) == 1 and one[0]["structure"]["experts"] == [2, 2, 2] and one[0]["train"]["steps"] == 10


def test_moe_student_exports_with_dense_routing_and_benches(moe_run):
    r = json.loads((moe_run / "report.json").read_text())
    roles = {v["role"]: v for v in r["variants"]}
    assert {"teacher", "student", "final", "pruned-oneshot"} <= set(roles)
    exp = json.loads((moe_run / "export" / "metrics.json").read_text())["artifacts"]
    assert exp["student-prune"]["parity_max_abs_diff"] < 1e-3
    assert exp["final"]["integer_matmuls"] == exp["final"]["quantized_linears"]
    # the pruned student is measured in ONNX Runtime and keeps most of its float accuracy in int8
    assert roles["final"]["accuracy"] > roles["student"]["accuracy"] - 5


@pytest.mark.parametrize(
    "prune,text",
    [
        ({"ffn_ratio": 0.5}, "expert_ratio is needed"),
        ({"expert_ratio": 0.75}, "too few for the router"),
    ],
)
def test_moe_student_with_bad_prune_settings_names_the_field(tmp_path, tiny_moe_dir, prune, text):
    with pytest.raises(RecipeError, match="stages.0.expert_ratio") as e:
        run_recipe(str(_recipe(tmp_path, tiny_moe_dir, prune)), out=tmp_path / "runs")
    assert text in e.value.message


# ---- the family matrix: every supported MoE family through the whole recipe ----------------------------------------

MATRIX_SEQ = 32


def _family_teacher(kind: str, root):
    """A tiny random teacher of ``kind`` (tests/unit/test_moe_families.tiny_config at vocabulary 256, routers that depend on the
    token), saved with save_pretrained. Untrained: 40 steps left these teachers at chance, so the pipeline is what is tested
    here; how much of a teacher the merge keeps is measured in docs/distillation.md's family table."""
    import sys
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from dsk_compress.compress.moe import family, moe_blocks, router_of

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_moe_families import tiny_config

    torch.manual_seed(0)
    wide = {"hidden_size": 64, **({"head_dim": 16} if kind in ("qwen3_moe", "glm4_moe", "gpt_oss") else {})}  # GQA kernels: head_dim 16
    model = AutoModelForCausalLM.from_config(
        tiny_config(kind, vocab_size=256, max_position_embeddings=128, **wide), attn_implementation="eager"
    )
    with torch.no_grad():
        for _, block in moe_blocks(model):
            router_of(family(model.config), block).weight.normal_(0, 0.3)
    model.save_pretrained(root / "teacher", safe_serialization=True)
    return root / "teacher"


# fused decoder graph (export.fused): which students it serves, and why not the others
FUSED = {
    "mixtral": True,
    "qwen2_moe": True,
    "qwen3_moe": True,
    "olmoe": True,
    "phimoe": True,
    "gpt_oss": True,
    "deepseek_v2": "no q/k/v/o projections",
    "deepseek_v3": "no q/k/v/o projections",
    "glm4_moe": "partial_rotary_factor",
    "granitemoe": "does not apply embedding_multiplier",
}


@pytest.mark.parametrize(
    "kind", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "granitemoe", "olmoe", "phimoe", "gpt_oss"]
)
def test_family_matrix_distills_prunes_quantizes_exports_and_benches(kind, tmp_path):
    """Load from a local folder, merge-init a dense student, distill, prune FFN channels, QAT, export (full, KV and fused where
    the attention allows) and bench; the report has every variant. Expert pruning of each family: tests/unit/test_moe_pruning."""
    import yaml

    teacher_dir = _family_teacher(kind, tmp_path)
    how = "torch" if kind == "deepseek_v2" else "onnx"  # DeepSeek-V2's complex rotary (aten::polar) does not export to ONNX
    data = {
        "name": f"matrix-{kind}",
        "teacher": {"hf": str(teacher_dir)},
        "student": {"from_teacher": {"keep_every": 1, "ffn_init": "merge", "calibration_batches": 2}},
        "task": {"name": "code-lm", "seq_len": MATRIX_SEQ, "eval_sequences": 16},
        "stages": [
            {"stage": "distill", "steps": 4, "batch_size": 8},
            {"stage": "prune", "ffn_ratio": 0.5, "steps": 2, "batch_size": 8, "round_to": 4},
            {"stage": "qat", "steps": 3, "batch_size": 8, "observer_steps": 2},
            {"stage": "export", "teacher": how, "ptq_baselines": False},
            {"stage": "bench", "runs": 2, "warmup": 1},
        ],
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    rd = run_recipe(str(p), out=tmp_path / "runs")
    dist = json.loads((rd / "distill" / "metrics.json").read_text())
    init = dist["init"]["accuracy"]
    teacher_acc = dist["teacher"]["accuracy"]
    assert dist["student_init"]["family"] == kind and dist["student_init"]["ffn_init"] == "merge" and 0 <= init <= 100
    exp = json.loads((rd / "export" / "metrics.json").read_text())["artifacts"]
    student = exp["student-prune"]
    assert student["parity_max_abs_diff"] < 1e-3 and "kv_cache_path" in student and "kv_cache_path" in exp["final"]
    fused = FUSED[kind]
    if fused is True:
        assert "fused_path" in student and "fused_path" in exp["final"]
    else:
        assert fused in student["fused"]["error"] and fused in exp["final"]["fused"]["error"]
    rep = json.loads((rd / "report.json").read_text())
    by = {v["name"]: v for v in rep["variants"]}
    assert {"teacher", "student-distill", "student-prune", "final"} <= set(by)
    if how == "torch":  # measured another way: no speed-up against it
        assert by["teacher"]["runtime"].startswith("torch") and by["final"]["speedup_vs_teacher"] is None
    else:
        assert by["final"]["speedup_vs_teacher"] > 0
    print(
        f"MATRIX {kind}: teacher {teacher_acc:.2f}% merge-init {init:.2f}% final {by['final']['accuracy']:.2f}% "
        f"fused {fused if fused is not True else 'yes'}"
    )
