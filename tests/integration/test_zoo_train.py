"""``dsk-compress zoo train``: one process, and data-parallel under torchrun with 2 CPU ranks (Gloo) giving the same
weights; rank 0 alone scores and writes them. ``--no-install`` keeps the package's zoo untouched."""

from __future__ import annotations

import json

import torch
from test_recipe_ddp import _launch

STEPS, BATCH = 2, 4


def test_zoo_train_one_process_and_under_torchrun_give_the_same_model(tmp_path):
    from safetensors.torch import load_file

    from dsk_compress.models.zoo import train_zoo, zoo_path

    installed = (zoo_path("code-lm-moe") / "model.safetensors").stat().st_mtime
    one = train_zoo("code-lm-moe", work_dir=tmp_path / "one", steps=STEPS, batch_size=BATCH, install=False)
    rc, log = _launch(
        [
            "-m",
            "dsk_compress.cli.main",
            "zoo",
            "train",
            "code-lm-moe",
            "--steps",
            str(STEPS),
            "--batch-size",
            str(BATCH),
            "--work-dir",
            str(tmp_path / "two"),
            "--no-install",
        ],
        tmp_path / "two.log",
    )
    assert rc == 0, log[-4000:]
    assert log.count("code-lm-moe: accuracy") == 1  # rank 0 alone reports
    two = json.loads((tmp_path / "two" / "final" / "card.json").read_text())
    assert one["training"]["world_size"] == 1 and two["training"]["world_size"] == 2
    assert one["training"]["tokens"] == two["training"]["tokens"] == STEPS * BATCH * 256
    assert one["task"] == two["task"] and one["training"]["schedule"] == two["training"]["schedule"] == [
        {"first_step": 1, "last_step": STEPS, "cosine_steps": STEPS, "batch_size": BATCH}
    ]
    assert abs(one["validation"]["bits_per_byte"] - two["validation"]["bits_per_byte"]) < 1e-3 * one["validation"]["bits_per_byte"]
    w1, w2 = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys() and all(w1[k].dtype == torch.float16 for k in w1)
    for k in w1:  # fp16 weights: the 2-rank float summation order can flip the last bit
        torch.testing.assert_close(w2[k].float(), w1[k].float(), rtol=2e-3, atol=1e-4)
    assert (zoo_path("code-lm-moe") / "model.safetensors").stat().st_mtime == installed
