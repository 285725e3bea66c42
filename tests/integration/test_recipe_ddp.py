"""``dsk-compress recipe`` under torchrun: 2 CPU ranks (Gloo) make the run one process makes, in one run directory
that rank 0 alone writes; a failure on one rank ends the job instead of hanging it, and ``--resume`` finishes it.

Three launches of ``python -m torch.distributed.run --standalone --nproc_per_node 2``: the CLI module itself on a
distill + prune + export recipe, then this file as a wrapper around the same CLI (run as a script it is the worker: it logs
every file a rank writes and can make rank 1 fail in the prune stage) to crash a run and resume it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BATCH = 4  # the global batch: 2 rows per rank
# 2 ranks x 2 rows vs 1 process x 4 rows differ only in float summation order, which Adam amplifies in the weights
BPB_REL_TOL = 1e-6  # validation bits per byte of the distilled and the pruned student
WEIGHT_ATOL = 1e-4  # seen: 5.6e-6 after 6 + 2 steps at lr 3e-3
LAUNCH_TIMEOUT_S = 300


def _launch(args: list[str], log: Path) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TERM": "dumb", "DSK_DIST_WAIT_S": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # its own process group, so a timeout takes torchrun's workers down with it
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s (a hang):\n" + out[-4000:]) from None
    log.write_text(out)
    return p.returncode, out


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    from conftest import tiny_llama_recipe

    return tiny_llama_recipe(
        tmp_path_factory.mktemp("recipe-ddp"),
        "tiny-ddp",
        [
            {"stage": "distill", "steps": 6, "batch_size": BATCH, "lr": 3e-3},
            {"stage": "prune", "ffn_ratio": 0.5, "iterations": 1, "steps": 2, "batch_size": BATCH},
            {"stage": "export"},  # rank 0 alone; the other rank waits for its result
        ],
    )


def _only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # exactly one run directory, not one per rank
    return runs[0]


def _weights(run: Path, stage: str) -> dict:
    from safetensors.torch import load_file

    return load_file(run / stage / "model" / "model.safetensors")


def test_recipe_under_torchrun_matches_one_process_fails_cleanly_and_resumes(tmp_path, tiny_recipe):
    from dsk_compress import run_recipe

    # 1. the CLI module under torchrun, and the same recipe in one process
    rc, log = _launch(["-m", "dsk_compress.cli.main", "recipe", str(tiny_recipe), "--out", str(tmp_path / "ddp")], tmp_path / "ddp.log")
    assert rc == 0, log[-4000:]
    assert log.count("run finished:") == 1  # rank 0 alone reports
    ddp = _only_run(tmp_path / "ddp")
    single = run_recipe(str(tiny_recipe), out=tmp_path / "single")
    m2, m1 = (json.loads((r / "manifest.json").read_text()) for r in (ddp, single))
    assert m2["status"] == "done" and m2["world_size"] == 2 and m1["world_size"] == 1
    assert [s["status"] for s in m2["stages"]] == ["done", "done", "done"]
    for s2, s1 in zip(m2["stages"][:2], m1["stages"][:2]):
        a, b = s2["metrics"], s1["metrics"]
        assert abs(a["bits_per_byte"] - b["bits_per_byte"]) <= BPB_REL_TOL * b["bits_per_byte"], (s2["stage"], a, b)
        assert a["accuracy"] == b["accuracy"]
        ta = a["train"] if "train" in a else a["iterations"][0]["train"]
        tb = b["train"] if "train" in b else b["iterations"][0]["train"]
        assert ta["world_size"] == 2 and tb["world_size"] == 1
        assert ta["tokens"] == tb["tokens"] == ta["steps"] * BATCH * 32  # the same global batches
        assert ta["final_loss"] == pytest.approx(tb["final_loss"], abs=1e-4)  # rounded to 4 decimals
    for stage in ("distill", "prune"):
        w2, w1 = _weights(ddp, stage), _weights(single, stage)
        assert {k: v.shape for k, v in w2.items()} == {k: v.shape for k, v in w1.items()}  # the same pruned structure
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL)
    assert w2["model.layers.0.mlp.up_proj.weight"].shape == (64, 64)  # ffn 128 -> 64
    arts = m2["stages"][2]["outputs"]["artifacts"]
    assert set(arts) == set(m1["stages"][2]["outputs"]["artifacts"]) == {"teacher", "student-distill", "student-prune"}
    assert all((ddp / a["path"]).is_file() for a in arts.values())

    # 2. rank 1 fails in the prune stage: the job ends (no hang), distill stays done
    crash = tmp_path / "crash"
    args = [__file__, str(tmp_path / "writes-a"), "recipe", str(tiny_recipe), "--out", str(crash)]
    rc, log = _launch([*args[:1], "fail-prune-on-rank1", *args[1:]], tmp_path / "crash.log")
    assert rc != 0 and "injected failure on rank 1" in log, log[-4000:]
    run = _only_run(crash)
    m = json.loads((run / "manifest.json").read_text())
    assert m["stages"][0]["status"] == "done" and m["stages"][1]["status"] in ("failed", "running"), m["stages"]
    distill_started = m["stages"][0]["started"]

    # 3. --resume under torchrun: distill is skipped, prune runs, and the result is the uninterrupted run's
    rc, log = _launch(
        [__file__, str(tmp_path / "writes-b"), "recipe", str(tiny_recipe), "--out", str(crash), "--resume"], tmp_path / "resume.log"
    )
    assert rc == 0, log[-4000:]
    assert _only_run(crash) == run
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done" and [s["status"] for s in m["stages"]] == ["done", "done", "done"]
    assert "traceback" not in m["stages"][1]
    assert m["stages"][0]["started"] == distill_started and "[distill] step" not in log
    assert m["stages"][1]["metrics"]["bits_per_byte"] == m2["stages"][1]["metrics"]["bits_per_byte"]
    w_resumed, w_ddp = _weights(run, "prune"), _weights(ddp, "prune")
    assert all(torch.equal(w_resumed[k], w_ddp[k]) for k in w_ddp)  # 2 ranks, interrupted or not: bit for bit

    # rank 0 alone wrote files, in both launches; rank 1 wrote nothing
    for d in ("writes-a", "writes-b"):
        assert not (tmp_path / d / "rank1.txt").exists(), (tmp_path / d / "rank1.txt").read_text()
    w0 = (tmp_path / "writes-b" / "rank0.txt").read_text().splitlines()
    assert str(run / "manifest.json") in w0 and str(run / "prune" / "model") in w0 and str(run / "prune" / "metrics.json") in w0


def _worker(argv: list[str]) -> None:
    """Under torchrun: log each file this rank writes, optionally fail rank 1 in prune, then run the CLI."""
    fail = argv[0] == "fail-prune-on-rank1"
    argv = argv[1:] if fail else argv
    log_dir, cli_args = Path(argv[0]), argv[1:]
    rank = int(os.environ["RANK"])

    import dsk_compress.io as io
    import dsk_compress.models.source as source

    def logged(fn, arg=0):
        def wrapper(*a, **k):
            log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_dir / f"rank{rank}.txt", "a") as f:
                f.write(f"{a[arg]}\n")
            return fn(*a, **k)

        return wrapper

    io.atomic_write_text = logged(io.atomic_write_text)  # every atomic_write_json
    io.save_state_dict = logged(io.save_state_dict, 1)  # trainer checkpoints (bound when the trainer is imported, below)
    source.save_hf_dir = logged(source.save_hf_dir, 1)
    if fail and rank == 1:
        from dsk_compress.recipes.stages.prune import PruneStage

        def boom(self, ctx):
            raise RuntimeError("injected failure on rank 1")

        PruneStage.run = boom
    from dsk_compress.cli.main import main

    sys.argv = ["dsk-compress", *cli_args]
    main()


if __name__ == "__main__":
    _worker(sys.argv[1:])
