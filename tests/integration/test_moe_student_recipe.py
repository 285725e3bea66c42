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
    stages = [{"stage": "qat", "steps": 5, "batch_size": 8, "observer_steps": 2}, {"stage": "export"}, {"stage": "bench", "runs": 3, "warmup": 1}]
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


@pytest.mark.parametrize("prune,text", [
    ({"ffn_ratio": 0.5}, "expert_ratio is needed"),
    ({"expert_ratio": 0.75}, "too few for the router"),
])
def test_moe_student_with_bad_prune_settings_names_the_field(tmp_path, tiny_moe_dir, prune, text):
    with pytest.raises(RecipeError, match="stages.0.expert_ratio") as e:
        run_recipe(str(_recipe(tmp_path, tiny_moe_dir, prune)), out=tmp_path / "runs")
    assert text in e.value.message
