"""The shipped teacher loads from safetensors and reproduces the accuracy on its card; ``zoo train``'s checkpoint
interval, corpus description, standard-library root and resume with a new ``--steps`` (on a tiny MoE and a tiny corpus)."""

from __future__ import annotations

import inspect
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dsk_compress.compress.trainer as trainer_mod
import dsk_compress.models.zoo as zoo
from dsk_compress.compress.trainer import TrainConfig, lr_lambda
from dsk_compress.errors import RunError, TaskError
from dsk_compress.models.zoo import ZOO, ZooSpec, load_zoo_model, torch_predict, train_zoo, zoo_card
from dsk_compress.tasks.code_lm import CodeLMTask


def test_zoo_registry_lists_code_lm_moe():
    assert "code-lm-moe" in ZOO.names()
    spec = ZOO.get("code-lm-moe")
    assert spec.config["num_local_experts"] == 8 and spec.config["num_experts_per_tok"] == 2


def test_shipped_teacher_reproduces_card_accuracy():
    card = zoo_card("code-lm-moe")
    if card is None:
        pytest.skip("no shipped weights")
    task = CodeLMTask(seq_len=card["task"]["seq_len"])
    if task.describe()["val_bytes"] != card["task"]["val_bytes"]:
        pytest.skip("this interpreter's standard library differs from the one the card was measured on")
    model = load_zoo_model("code-lm-moe")
    assert sum(p.numel() for p in model.parameters()) == card["params"]
    m = task.evaluate(torch_predict(model))
    assert m.accuracy == pytest.approx(card["validation"]["accuracy"], abs=0.01)  # 77.39% under transformers 4.57 and 5.25 alike
    assert m.extra["bits_per_byte"] == pytest.approx(card["validation"]["bits_per_byte"], abs=0.001)


def test_shipped_weights_are_small_enough_for_the_repo():
    from dsk_compress.models.zoo import zoo_path

    w = zoo_path("code-lm-moe") / "model.safetensors"
    if not w.is_file():
        pytest.skip("no shipped weights")
    assert w.stat().st_size <= 50 * 1024 * 1024


def test_load_zoo_model_rejects_corrupt_weights(tmp_path, monkeypatch):
    import dsk_compress.models.zoo as zoo
    from dsk_compress.errors import ModelSourceError

    d = tmp_path / "code-lm-moe"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    with pytest.raises(ModelSourceError, match="corrupt checkpoint"):
        load_zoo_model("code-lm-moe")


# ---- zoo train: checkpoint interval, corpus on the card, a given standard-library root, resume with new --steps ----

TINY = ZooSpec(
    name="tiny-moe",
    description="a tiny Mixtral for tests",
    model_type="mixtral",
    config=dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    steps=4,
    batch_size=2,
    lr=2e-3,
    warmup=1,
)


def _fake_stdlib(root: Path) -> Path:
    """80 small .py files in 8 packages (5 of them fall in the validation split): a corpus of ~120 KB."""
    for i in range(80):
        p = root / f"pkg{i // 10}" / f"mod_{i:03d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}  # {'abc' * (j % 5)}\n\n" for j in range(30)))
    return root


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    """The tiny zoo model registered, an empty zoo, a private corpus cache and a fake Python 3.9 standard library."""
    monkeypatch.setitem(zoo.ZOO._items, TINY.name, TINY)
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    monkeypatch.setenv("DSK_COMPRESS_CACHE", str(tmp_path / "cache"))
    return _fake_stdlib(tmp_path / "host-a" / "lib" / "python3.9")


def _record_checkpoints(monkeypatch) -> list[int]:
    saved: list[int] = []
    orig = trainer_mod._save_checkpoint

    def spy(ckpt_dir, model, opt, sched, step, *a, **k):
        saved.append(step)
        return orig(ckpt_dir, model, opt, sched, step, *a, **k)

    monkeypatch.setattr(trainer_mod, "_save_checkpoint", spy)
    return saved


def _record_lrs(monkeypatch, stop: dict) -> list[float]:
    """The learning rate of every optimizer step; an interrupt (as Ctrl-C) when ``stop["after"]`` steps were recorded."""
    lrs: list[float] = []
    orig = torch.optim.AdamW.step

    def step(self, *a, **k):
        if len(lrs) == stop.get("after"):
            raise KeyboardInterrupt
        lrs.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return lrs


def test_code_lm_stdlib_root_copy_gives_the_same_corpus_and_fingerprint(tiny_zoo, tmp_path):
    copy = shutil.copytree(tiny_zoo, tmp_path / "host-b" / "elsewhere")
    a, b = CodeLMTask(stdlib_root=tiny_zoo), CodeLMTask(stdlib_root=copy)
    assert a.fingerprint() == b.fingerprint() and a.describe()["corpus_fingerprint"] == b.describe()["corpus_fingerprint"]
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val) and len(a.val) > 2 * 257
    assert a.describe()["stdlib_root"] == str(tiny_zoo.resolve()) and b.describe()["stdlib_root"] == str(Path(copy).resolve())
    (Path(copy) / "pkg0" / "extra.py").write_text("x = 1\n")
    assert CodeLMTask(stdlib_root=copy).fingerprint() != a.fingerprint()
    assert CodeLMTask(stdlib_root=tiny_zoo).fingerprint() != CodeLMTask(seq_len=32, eval_sequences=8).fingerprint()


def test_code_lm_describes_the_corpus_python_not_the_interpreter(tiny_zoo, tmp_path):
    assert CodeLMTask(stdlib_root=tiny_zoo).describe()["python"] == "3.9"  # from the folder name
    copy = Path(shutil.copytree(tiny_zoo, tmp_path / "stdlib-copy"))
    assert CodeLMTask(stdlib_root=copy).describe()["python"] is None  # nothing says which Python it is
    (copy / "_sysconfigdata__linux_x86_64-linux-gnu.py").write_text("build_time_vars = {'SOABI': 'x', 'VERSION': '3.10', 'py': 1}\n")
    assert CodeLMTask(stdlib_root=copy).describe()["python"] == "3.10"  # the build data copied with the .py files
    own = CodeLMTask(seq_len=32, eval_sequences=8).describe()
    assert own["python"] == platform.python_version() and Path(own["stdlib_root"]).is_dir()


def test_code_lm_stdlib_root_without_sources_is_a_task_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DSK_COMPRESS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="no .py files under"):
        CodeLMTask(stdlib_root=tmp_path / "empty")
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.py").write_text("x = 1\n")
    with pytest.raises(TaskError, match="too small for seq_len 256"):
        CodeLMTask(stdlib_root=tmp_path / "small")


def test_train_zoo_writes_a_checkpoint_every_ckpt_every_steps(tiny_zoo, tmp_path, monkeypatch):
    from dsk_compress.cli.main import zoo_train

    saved = _record_checkpoints(monkeypatch)
    train_zoo("tiny-moe", work_dir=tmp_path / "w", steps=5, ckpt_every=2, install=False, stdlib_root=tiny_zoo)
    assert saved == [2, 4, 5]  # every 2 steps and at the end
    card = json.loads((tmp_path / "w" / "final" / "card.json").read_text())
    assert card["training"]["ckpt_every"] == 2
    assert inspect.signature(train_zoo).parameters["ckpt_every"].default == zoo.DEFAULT_CKPT_EVERY == 500
    assert inspect.signature(zoo_train).parameters["ckpt_every"].default == zoo.DEFAULT_CKPT_EVERY  # the CLI's default


def test_train_zoo_card_describes_the_corpus_from_a_given_stdlib_root(tiny_zoo, tmp_path):
    copy = shutil.copytree(tiny_zoo, tmp_path / "gpu-host" / "stdlib" / "python3.9")  # another host's copy of that stdlib
    card = train_zoo("tiny-moe", work_dir=tmp_path / "w", steps=2, install=True, stdlib_root=copy)
    installed = json.loads((tmp_path / "zoo" / "tiny-moe" / "card.json").read_text())
    assert installed == card
    t = card["task"]
    assert t["python"] == "3.9" and t["stdlib_root"] == str(Path(copy).resolve())
    assert t["corpus_fingerprint"] == CodeLMTask(stdlib_root=tiny_zoo).describe()["corpus_fingerprint"]  # the same corpus as the source
    assert card["training"]["python"] == platform.python_version()  # the trainer's interpreter, apart from the corpus
    assert card["training"]["precision"] == "fp32" and card["training"]["schedule"] == [
        {"first_step": 1, "last_step": 2, "cosine_steps": 2, "batch_size": 2}
    ]
    assert "Python 3.9 standard library" in (tmp_path / "zoo" / "tiny-moe" / "README.md").read_text()


def test_train_zoo_resume_with_more_steps_runs_the_new_cosine_from_the_checkpoint(tiny_zoo, tmp_path, monkeypatch):
    work, stop = tmp_path / "w", {"after": 3}
    lrs = _record_lrs(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):  # an 8-step run stopped after its step-2 checkpoint (step 3 never saved)
        train_zoo("tiny-moe", work_dir=work, steps=8, ckpt_every=2, install=False, stdlib_root=tiny_zoo)
    stop.clear()
    lrs.clear()
    card = train_zoo("tiny-moe", work_dir=work, steps=5, ckpt_every=2, install=False, stdlib_root=tiny_zoo)
    f8, f5 = (lr_lambda(TrainConfig(steps=n, warmup=TINY.warmup)) for n in (8, 5))
    assert lrs == pytest.approx([TINY.lr * f5(s) for s in (2, 3, 4)], rel=1e-12)  # the new schedule from the checkpoint's step on
    assert f5(2) != pytest.approx(f8(2))  # (the saved optimizer's own learning rate would fail the line above)
    assert card["training"]["steps"] == 5 and card["training"]["tokens"] == 5 * TINY.batch_size * 256
    assert card["training"]["schedule"] == [
        {"first_step": 1, "last_step": 2, "cosine_steps": 8, "batch_size": 2},
        {"first_step": 3, "last_step": 5, "cosine_steps": 5, "batch_size": 2, "resumed_from_step": 2},
    ]
    assert "steps 3-5 under a 5-step schedule (resumed from the step-2 checkpoint)" in (work / "final" / "README.md").read_text()


def test_train_zoo_resume_refuses_fewer_steps_or_another_lr(tiny_zoo, tmp_path):
    work = tmp_path / "w"
    train_zoo("tiny-moe", work_dir=work, steps=3, install=False, stdlib_root=tiny_zoo)
    with pytest.raises(RunError, match="is at step 3; --steps 2 cannot resume it"):
        train_zoo("tiny-moe", work_dir=work, steps=2, install=False, stdlib_root=tiny_zoo)
    with pytest.raises(RunError, match="trained at peak lr 0.002, --lr is 0.001"):
        train_zoo("tiny-moe", work_dir=work, steps=4, lr=1e-3, install=False, stdlib_root=tiny_zoo)
    card = train_zoo("tiny-moe", work_dir=work, steps=2, resume=False, install=False, stdlib_root=tiny_zoo)  # --no-resume starts over
    assert card["training"]["tokens"] == 2 * TINY.batch_size * 256


def test_zoo_train_cli_refuses_fewer_steps_than_the_checkpoint_in_one_line(tmp_path):
    ckpt = tmp_path / "w" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 10, "history": [], "tokens": 0, "seconds": 0.0}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsk_compress.cli.main",
            "zoo",
            "train",
            "code-lm-moe",
            "--steps",
            "5",
            "--work-dir",
            str(tmp_path / "w"),
            "--no-install",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("error: the checkpoint in") and "--steps 5 cannot resume it" in lines[0] and "--steps 10 or more" in lines[0]
