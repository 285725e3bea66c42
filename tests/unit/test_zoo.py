"""The shipped teacher loads from safetensors and reproduces the accuracy on its card."""

from __future__ import annotations

import pytest

from dsk_compress.models.zoo import ZOO, load_zoo_model, torch_predict, zoo_card


def test_zoo_registry_lists_code_lm_moe():
    assert "code-lm-moe" in ZOO.names()
    spec = ZOO.get("code-lm-moe")
    assert spec.config["num_local_experts"] == 8 and spec.config["num_experts_per_tok"] == 2


def test_shipped_teacher_reproduces_card_accuracy():
    card = zoo_card("code-lm-moe")
    if card is None:
        pytest.skip("no shipped weights")
    from dsk_compress.tasks.code_lm import CodeLMTask

    task = CodeLMTask(seq_len=card["task"]["seq_len"])
    if task.describe()["val_bytes"] != card["task"]["val_bytes"]:
        pytest.skip("this interpreter's standard library differs from the one the card was measured on")
    model = load_zoo_model("code-lm-moe")
    assert sum(p.numel() for p in model.parameters()) == card["params"]
    m = task.evaluate(torch_predict(model))
    assert m.accuracy == pytest.approx(card["validation"]["accuracy"], abs=0.05)
    assert m.extra["bits_per_byte"] == pytest.approx(card["validation"]["bits_per_byte"], abs=0.005)


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
