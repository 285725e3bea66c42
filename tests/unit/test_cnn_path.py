"""Your own torch model on your own task: conv channel pruning, save / reload, BatchNorm folding, conv QAT -> ONNX integer ops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kept_rows

REPO = Path(__file__).resolve().parents[2]
FACTORY = "examples.digits.model:make_cnn"
TASK = "examples.digits.task:make_task"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Factories are named relative to the repository root, as in the example's instructions."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def task():
    sys.path.insert(0, str(REPO))
    from examples.digits.task import make_task

    return make_task()


def _cnn(seed: int = 0):
    """The example CNN from its factory with random, distinct BatchNorm statistics (so folding and zeroing are not trivial)."""
    from dsk_compress.models.source import load_model_source

    torch.manual_seed(seed)
    m = load_model_source({"torch": FACTORY})
    with torch.no_grad():
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _bn_rows(bn) -> torch.Tensor:
    return torch.stack([bn.weight, bn.bias, bn.running_mean, bn.running_var], 1).detach()


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_prune_channels_gives_exact_counts_and_mac_reduction(task, importance):
    import torch.nn.functional as F

    from dsk_compress.compress.cnn import conv_widths, count_macs, prune_channels, target_widths

    m = _cnn()
    x = torch.as_tensor(task.example_inputs(1))
    xb, yb = task.train_batch(0, 16)
    assert count_macs(m, x) == 159_232  # 9216 + 73728 + 73728 conv + 2560 linear
    widths = target_widths(conv_widths(m), 0.5, 8)
    assert widths == {"features.0": 8, "features.3": 16, "features.6": 32}
    after = prune_channels(m, widths, x, importance, loss=lambda mm: F.cross_entropy(mm(xb), yb))
    assert after == widths
    assert [m.features[i].num_features for i in (1, 4, 7)] == [8, 16, 32]
    assert m.classifier.in_features == 32 * 2 * 2 and m.classifier.out_features == 10  # the task's classes are never pruned
    assert count_macs(m, x) == 8 * 9 * 64 + 16 * 8 * 9 * 16 + 32 * 16 * 9 * 4 + 128 * 10 == 42_752  # 73.2% fewer


def test_channel_counts_round_down_to_a_multiple_of_round_to():
    from dsk_compress.compress.cnn import channel_keep, interpolate_widths

    assert [channel_keep(c, 0.3, 8) for c in (64, 32, 16, 8, 6)] == [40, 16, 8, 8, 6]
    assert channel_keep(64, 0.5, 16) == 32 and channel_keep(64, 0.9, 8) == 8
    mid = interpolate_widths({"a": 64, "b": 16}, {"a": 32, "b": 8}, 0.5, 8)
    assert mid == {"a": 48, "b": 8}


def test_pruned_model_equals_unpruned_with_removed_channels_zeroed(task):
    from dsk_compress.compress.cnn import prune_channels

    ref, m = _cnn(), _cnn()
    x = torch.as_tensor(task.example_inputs(32))
    prune_channels(m, {"features.0": 8, "features.3": 16, "features.6": 24}, x[:1], "l2")
    hooks = []
    for i in (1, 4, 7):  # zero each removed channel where the BatchNorm writes it (ReLU keeps it at 0)
        keep = kept_rows(_bn_rows(ref.features[i]), _bn_rows(m.features[i]))
        drop = sorted(set(range(ref.features[i].num_features)) - set(keep))
        assert len(keep) == m.features[i].num_features and drop

        def zero(_mod, _inp, out, drop=drop):
            out = out.clone()
            out[:, drop] = 0
            return out

        hooks.append(ref.features[i].register_forward_hook(zero))
    with torch.no_grad():
        want, got = ref(x), m(x)
    for h in hooks:
        h.remove()
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())


def test_pruned_model_saves_as_safetensors_and_reloads_bit_exact(task, tmp_path):
    from dsk_compress.compress.cnn import prune_channels
    from dsk_compress.models.source import load_model_dir, save_model_dir

    m = _cnn()
    x = torch.as_tensor(task.example_inputs(16))
    prune_channels(m, {"features.0": 8, "features.3": 16, "features.6": 32}, x[:1], "l2")
    d = save_model_dir(m, tmp_path / "pruned")
    assert sorted(p.name for p in d.iterdir()) == ["dsk_model.json", "model.safetensors"]  # no pickle
    back = load_model_dir(d)
    assert back.features[3].in_channels == 8 and back.features[3].out_channels == 16 and back.classifier.in_features == 128
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_fold_batchnorm_matches_unfolded_model_in_eval(task):
    from dsk_compress.compress.cnn import fold_batchnorm

    m = _cnn()
    x = torch.as_tensor(task.example_inputs(64))
    with torch.no_grad():
        ref = m(x)
    pairs = fold_batchnorm(m, x[:4])
    assert pairs == [("features.0", "features.1"), ("features.3", "features.4"), ("features.6", "features.7")]
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    with torch.no_grad():
        assert float((m(x) - ref).abs().max()) < 1e-5


def test_qat_conv_model_saves_and_reloads(task, tmp_path):
    from dsk_compress.compress.cnn import fold_batchnorm, forward
    from dsk_compress.compress.qat import QuantConv2d, calibrate, prepare_qat
    from dsk_compress.models.source import load_model_dir, save_model_dir

    m = _cnn()
    pairs = fold_batchnorm(m, torch.as_tensor(task.example_inputs(4)))
    names = prepare_qat(m, skip=[])
    assert sorted(names) == ["classifier", "features.0", "features.3", "features.6"]
    calibrate(m, task.calibration_batches(4, 16), forward=forward)
    qat = {"weight_bits": 8, "avx2_safe": True, "skip": [], "activations": "asymmetric"}
    back = load_model_dir(save_model_dir(m, tmp_path / "q", extra={"bn_folded": [list(p) for p in pairs], "qat": qat}))
    assert sum(isinstance(mod, QuantConv2d) for mod in back.modules()) == 3
    x = torch.as_tensor(task.example_inputs(16))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_conv_qat_exports_to_integer_convs_with_high_sqnr(task, tmp_path):
    """Every quantized conv runs as QLinearConv and the Linear as an integer matmul in ORT (optimizations on);
    SQNR of the ORT output vs the torch fake-quant model must be >= 35 dB (measured ~60 dB)."""
    import warnings

    from dsk_compress.compress.cnn import fold_batchnorm, forward
    from dsk_compress.compress.qat import calibrate, freeze_for_export, prepare_qat, quant_layers, sqnr_db
    from dsk_compress.export.cnn import export_int8_qdq, integer_ops, ort_optimize
    from dsk_compress.export.onnx import op_histogram, ort_predict

    m = _cnn()
    fold_batchnorm(m, torch.as_tensor(task.example_inputs(4)))
    prepare_qat(m, skip=[])
    calibrate(m, task.calibration_batches(8, 32), forward=forward)
    freeze_for_export(m)
    x = task.example_inputs(64)
    with torch.no_grad():
        ref = m(torch.as_tensor(x)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = export_int8_qdq(m, x[:2], tmp_path / "q.qdq.onnx")
        out = ort_optimize(tmp_path / "q.qdq.onnx", tmp_path / "q.onnx")
    hist = op_histogram(out)
    assert info["folded_weights"] == 4 and info["gemms_to_matmul"] == 1
    assert hist.get("QLinearConv", 0) + hist.get("ConvInteger", 0) == 3
    assert integer_ops(hist) == len(quant_layers(m)) == 4
    assert "Conv" not in hist and "FusedConv" not in hist and "Gemm" not in hist
    got = ort_predict(out)(x)
    assert got.shape == (64, 10)  # dynamic batch: exported at batch 2
    assert sqnr_db(ref, got) >= 35.0


# ---- bad input: one line, exit code 2 --------------------------------------------------------------


def _recipe(tmp_path, **over) -> Path:
    import yaml

    data = {
        "name": "mine",
        "teacher": {"torch": FACTORY},
        "student": {"torch": FACTORY},
        "task": {"torch": TASK},
        "stages": [{"stage": "qat", "steps": 1}, {"stage": "export"}],
    }
    data.update(over)
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_recipe_with_torch_task_and_student_validates(tmp_path):
    from dsk_compress import load_recipe

    spec = load_recipe(str(_recipe(tmp_path)))
    assert spec.task.name == "torch" and spec.task.torch == TASK and spec.student.torch == FACTORY


@pytest.mark.parametrize(
    "task_target, message",
    [
        ("nope:make", "task.torch: cannot import 'nope'"),
        ("examples.digits.task:__doc__", "not a callable factory"),
        ("examples.digits.task:missing", "has no attribute 'missing'"),
        ("examples.digits.task", "is not 'package.module:factory'"),
    ],
)
def test_bad_task_target_is_one_recipe_error(tmp_path, task_target, message):
    from dsk_compress import load_recipe
    from dsk_compress.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        load_recipe(str(_recipe(tmp_path, task={"torch": task_target})))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_torch_student_refuses_lm_only_settings(tmp_path):
    from dsk_compress import load_recipe
    from dsk_compress.errors import RecipeError

    with pytest.raises(RecipeError, match="stages.0.ffn_ratio applies to Hugging Face students"):
        load_recipe(str(_recipe(tmp_path, stages=[{"stage": "prune", "ffn_ratio": 0.5}])))
    with pytest.raises(RecipeError, match="student.torch needs your own task"):
        load_recipe(str(_recipe(tmp_path, task={"name": "code-lm"})))


def test_task_factory_returning_an_incomplete_task_is_a_task_error():
    from dsk_compress.errors import TaskError
    from dsk_compress.tasks import build_task

    with pytest.raises(TaskError, match="without train_batch"):
        build_task({"torch": "examples.digits.model:make_cnn"})  # a model, not a task


def test_cli_bad_task_target_prints_one_line_and_exits_2(tmp_path):
    p = _recipe(tmp_path, task={"torch": "nope:make"})
    proc = subprocess.run(
        [sys.executable, "-m", "dsk_compress.cli.main", "recipe", str(p), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "task.torch: cannot import 'nope'" in lines[0]
