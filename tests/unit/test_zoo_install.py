"""``zoo train`` never replaces installed zoo weights silently: it refuses without ``force``, and with it keeps the
replaced files in the work directory."""

from __future__ import annotations

import json

import pytest
from test_zoo import tiny_zoo  # noqa: F401  (fixture: the tiny zoo model, an empty zoo in tmp_path, a fake stdlib)

from dsk_compress.errors import RunError
from dsk_compress.models.zoo import train_zoo, zoo_path


def test_zoo_train_refuses_to_replace_installed_weights_without_force(tiny_zoo, tmp_path):  # noqa: F811
    first = train_zoo("tiny-moe", work_dir=tmp_path / "w1", steps=1, install=True, stdlib_root=tiny_zoo)
    weights = (zoo_path("tiny-moe") / "model.safetensors").read_bytes()
    with pytest.raises(RunError, match="would replace") as e:
        train_zoo("tiny-moe", work_dir=tmp_path / "w2", steps=2, install=True, stdlib_root=tiny_zoo)
    assert "--force" in e.value.hint and "--no-install" in e.value.hint
    assert not (tmp_path / "w2" / "checkpoint").exists()  # refused before any training
    assert (zoo_path("tiny-moe") / "model.safetensors").read_bytes() == weights
    assert json.loads((zoo_path("tiny-moe") / "card.json").read_text()) == first


def test_zoo_train_with_force_keeps_the_replaced_weights_in_the_work_dir(tiny_zoo, tmp_path):  # noqa: F811
    first = train_zoo("tiny-moe", work_dir=tmp_path / "w1", steps=1, install=True, stdlib_root=tiny_zoo)
    old = (zoo_path("tiny-moe") / "model.safetensors").read_bytes()
    second = train_zoo("tiny-moe", work_dir=tmp_path / "w2", steps=2, install=True, force=True, stdlib_root=tiny_zoo)
    assert json.loads((zoo_path("tiny-moe") / "card.json").read_text()) == second
    backups = sorted((tmp_path / "w2").glob("replaced-*"))
    assert len(backups) == 1
    assert (backups[0] / "model.safetensors").read_bytes() == old
    assert json.loads((backups[0] / "card.json").read_text()) == first


def test_zoo_train_cli_installs_only_with_force_over_shipped_weights():
    import inspect

    from dsk_compress.cli.main import zoo_train

    params = inspect.signature(zoo_train).parameters
    assert "force" in params and params["force"].default is False
