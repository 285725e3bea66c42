"""The export stage's artifacts are typed: the manifest keeps the same JSON mapping, readers get an Artifact, and a
damaged entry fails in one line naming the variant and the field."""

from __future__ import annotations

import json

import pytest

from dsk_compress.artifacts import Artifact, artifacts_json, read_artifacts
from dsk_compress.errors import RunError

# an entry as the export stage writes it into manifest.json (int8 QAT student with its decoder graphs and checks)
FINAL = {
    "path": "export/student-int8.onnx",
    "role": "final",
    "precision": "int8",
    "params": 1234,
    "qdq_path": "export/student-int8.qdq.onnx",
    "activations": "symmetric",
    "sqnr_db": 41.5,
    "fused_ops": {"MatMulIntegerToFloat": 28},
    "notes": "INT8 Q/DQ (per-channel weights, per-tensor symmetric activations)",
    "kv_cache_path": "export/student-int8.kv.onnx",
    "kv_cache": {"path": "export/student-int8.kv.onnx", "tokens_match": True},
    "fused_path": "export/student-int8.fused.onnx",
    "fused": {"fused_ops": {"GroupQueryAttention": 4}},
    "tensorrt": {"ok": True, "engine": "export/student-int8.gpu-server.engine"},
}
TEACHER_TORCH = {
    "path": None,
    "model_dir": "export/teacher-torch",
    "role": "teacher",
    "params": 99,
    "precision": "fp32",
    "notes": "ONNX export failed (x); measured in PyTorch eager",
}


def test_artifact_round_trips_the_manifest_mapping_exactly():
    arts = read_artifacts({"final": FINAL, "teacher": TEACHER_TORCH})
    final = arts["final"]
    assert final.name == "final" and final.precision == "int8" and final.params == 1234
    assert final.decoder_graph == "export/student-int8.fused.onnx" and final.decoder_fused_ops == {"GroupQueryAttention": 4}
    assert final.engine == "export/student-int8.gpu-server.engine"
    assert final.graphs() == {
        "full": "export/student-int8.onnx",
        "qdq": "export/student-int8.qdq.onnx",
        "kv": "export/student-int8.kv.onnx",
        "fused": "export/student-int8.fused.onnx",
    }
    assert final.model_extra == {"sqnr_db": 41.5}  # the check's own numbers ride along
    back = artifacts_json(arts)
    assert back == {"final": FINAL, "teacher": TEACHER_TORCH}
    assert json.loads(json.dumps(back)) == back
    assert arts["teacher"].graphs() == {} and arts["teacher"].decoder_graph is None


def test_artifact_defaults_match_what_readers_assumed():
    art = Artifact.of("x", {"path": "export/x.onnx"})
    assert (art.precision, art.notes, art.role, art.params) == ("fp32", "", None, None)
    assert art.to_json() == {"path": "export/x.onnx"}  # nothing added to the manifest
    assert Artifact.of("y", art).name == "y"
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        art.role = "final"  # frozen: readers never change what export wrote


@pytest.mark.parametrize(
    "data, words",
    [
        ({"final": {**FINAL, "params": "many"}}, ["artifact 'final'", "params"]),
        ({"final": {**FINAL, "fused_ops": ["MatMul"]}}, ["artifact 'final'", "fused_ops"]),
        ({"final": "export/x.onnx"}, ["artifact 'final' is a str"]),
        (["final"], ["is a list"]),
    ],
)
def test_damaged_manifest_entry_fails_in_one_line(data, words):
    with pytest.raises(RunError) as exc:
        read_artifacts(data, "runs/r/manifest.json: the export stage's artifacts")
    msg = exc.value.message
    assert "\n" not in msg and msg.startswith("runs/r/manifest.json") and all(w in msg for w in words)
    assert "--rerun-from export" in exc.value.hint


def test_bench_reads_artifacts_through_the_type():
    from dsk_compress.devices import load_device
    from dsk_compress.recipes.stages.bench import Plan, runtime_plans

    cpu = ["CPUExecutionProvider"]
    plans = runtime_plans(read_artifacts({"final": FINAL})["final"], load_device("gpu-server"), cpu, "x86_64", cuda=True, tensorrt=True)
    assert plans[-1] == Plan("tensorrt", "export/student-int8.gpu-server.engine", device="cuda")
    assert runtime_plans(Artifact.of("teacher", TEACHER_TORCH), load_device("host-cpu"), cpu, "x86_64", cuda=False, tensorrt=False) == [
        Plan("torch", "export/teacher-torch")
    ]
