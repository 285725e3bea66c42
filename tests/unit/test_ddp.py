"""torchrun data parallelism: 2 CPU processes (Gloo) take the same steps as 1 process with the same global batch.

The test launches this very file under ``python -m torch.distributed.run --nproc_per_node 2`` on
127.0.0.1 and a free port; run as a script it is the worker each rank executes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

STEPS, BATCH, SEQ = 5, 4, 16
REL_TOL = 1e-5  # loss curves: 2 ranks x 2 rows vs 1 process x 4 rows differ only in float summation order
# weights: Adam turns summation-order noise in near-zero gradients into up to ~lr-sized moves; 1e-5 is 0.1% of lr 1e-2
PARAM_ATOL = 1e-5


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    m = LlamaForCausalLM(cfg)
    m.config._attn_implementation = "eager"
    return m


def _batch(i, bs):
    return torch.randint(0, 64, (bs, SEQ), generator=torch.Generator().manual_seed(i))


def _loss(m, x, i):
    from dsk_compress.models.zoo import lm_loss

    loss = lm_loss(m(input_ids=x, use_cache=False).logits, x)
    return loss, {"ce": float(loss.detach())}


_VAL = _batch(10_000, 8)


def _val_loss(m):
    from dsk_compress.models.zoo import lm_loss

    with torch.no_grad():
        return {"val_loss": float(lm_loss(m(input_ids=_VAL, use_cache=False).logits, _VAL))}


def _cfg():
    from dsk_compress.compress.trainer import TrainConfig

    return TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, warmup=1, eval_every=1, ckpt_every=2)


def _run(ckpt: Path, stop_at: int | None = None, desc: str = "ddp"):
    from dsk_compress.compress.trainer import train

    model = _tiny_lm()
    calls = {"n": 0}
    rows: list = []

    def loss_fn(m, x, i):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        rows.append(x.tolist())
        return _loss(m, x, i)

    res = train(model, loss_fn, _batch, _cfg(), ckpt_dir=ckpt, evaluate=_val_loss, desc=desc)
    res.rows = rows
    return model, res


def _run_hidden():
    """KD with hidden-state MSE: the projections (outside the DDP wrapper) must stay in sync too."""
    from dsk_compress.compress.distill import HiddenStateMSE, make_kd_loss_fn
    from dsk_compress.compress.trainer import TrainConfig, train

    teacher = _tiny_lm()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1.1)
    student = _tiny_lm()
    hidden = HiddenStateMSE([(0, 1), (1, 0)], 32, 32)
    fn = make_kd_loss_fn(teacher, 2.0, 0.5, hidden=hidden, hidden_weight=1.0)
    train(student, fn, _batch, TrainConfig(steps=3, batch_size=BATCH, lr=1e-2, warmup=1), aux=hidden, desc="hidden")
    return {**{f"student.{k}": v for k, v in student.state_dict().items()}, **{f"aux.{k}": v for k, v in hidden.state_dict().items()}}


def _rank0_helpers(rank: int) -> dict:
    """dist.on_main and the control-group collectives, as each rank sees them."""
    from dsk_compress.compress import dist
    from dsk_compress.errors import DskError, RecipeError

    # inside on_main rank 0 works alone: one process, collectives are no-ops
    value = dist.on_main(lambda: [dist.env().world_size, dist.broadcast_object(rank), dist.all_gather_object(rank), rank])

    def fail():
        raise RecipeError("bad field", hint="fix it")

    try:
        dist.on_main(fail, "the test")
        error = None
    except DskError as e:
        error = [type(e).__name__, e.message, e.hint]
    return {"on_main": value, "on_main_error": error, "gathered": dist.all_gather_object(rank)}


def _worker(out: Path) -> None:
    from safetensors.torch import save_file

    rank = int(os.environ["RANK"])
    model, res = _run(out / "full", desc="ddp-full")
    try:
        _run(out / "resumed", stop_at=4)  # every rank dies in step 4, after the step-2 checkpoint
    except KeyboardInterrupt:
        pass
    resumed, rres = _run(out / "resumed", desc="ddp-resumed")
    save_file({k: v.contiguous() for k, v in _run_hidden().items()}, str(out / f"hidden-rank{rank}.safetensors"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"full-rank{rank}.safetensors"))
    save_file({k: v.contiguous() for k, v in resumed.state_dict().items()}, str(out / f"resumed-rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "history": res.history,
                "rows": res.rows,
                "tokens": res.tokens,
                "world_size": res.world_size,
                "final_loss": res.final_loss,
                "final_logs": res.final_logs,
                "resumed_from": rres.resumed_from,
                "resumed_history": rres.history,
                **_rank0_helpers(rank),
            }
        )
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TERM": "dumb"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        __file__,
        str(tmp_path),
    ]
    # own process group, so a timeout takes torchrun's workers down with it instead of orphaning them
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        raise AssertionError("torchrun did not finish in 600 s:\n" + log[-4000:]) from None
    assert p.returncode == 0, log[-4000:]

    # one process, the same global batch of 4
    ref_model, ref = _run(tmp_path / "single", desc="single")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["tokens"] == ref.tokens == STEPS * BATCH * SEQ
    losses = [h["loss"] for h in r0["history"]]
    ref_losses = [h["loss"] for h in ref.history]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= REL_TOL * abs(b), (losses, ref_losses)
    for a, b in zip([h["val_loss"] for h in r0["history"]], [h["val_loss"] for h in ref.history]):
        assert abs(a - b) <= REL_TOL * abs(b)
    assert r1["history"] == r0["history"]  # rank 0's validation reaches every rank
    # on_main: rank 0's result on every rank; its error re-raised there and a RunError with its message elsewhere
    assert r0["on_main"] == r1["on_main"] == [1, 0, [0], 0]
    assert r0["on_main_error"] == ["RecipeError", "bad field", "fix it"]
    assert r1["on_main_error"] == ["RunError", "the test failed on rank 0: bad field", "fix it"]
    assert r0["gathered"] == r1["gathered"] == [0, 1]
    # the loss function's last logs are averaged over ranks: the global batch's value, on every rank
    assert abs(r0["final_logs"]["ce"] - ref.final_logs["ce"]) <= REL_TOL * ref.final_logs["ce"] and r1["final_logs"] == r0["final_logs"]
    # each rank trained on its own half of every global batch: disjoint, and together the whole batch
    for i in range(STEPS):
        assert len(r0["rows"][i]) == len(r1["rows"][i]) == BATCH // 2
        assert r0["rows"][i] + r1["rows"][i] == _batch(i, BATCH).tolist()

    full0, full1 = load_file(tmp_path / "full-rank0.safetensors"), load_file(tmp_path / "full-rank1.safetensors")
    ref_state = ref_model.state_dict()
    for k, v in full0.items():
        assert torch.equal(v, full1[k]), k  # ranks stay bit-identical
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=PARAM_ATOL)
    # only rank 0 wrote the checkpoint, and it is the model every rank holds
    ck = load_file(tmp_path / "full" / "model.safetensors")
    assert all(torch.equal(ck[k], full0[k]) for k in ck)

    # interrupted in step 4 and resumed by both ranks from the step-2 checkpoint: the same weights bit for bit
    assert r0["resumed_from"] == r1["resumed_from"] == 2
    res0, res1 = load_file(tmp_path / "resumed-rank0.safetensors"), load_file(tmp_path / "resumed-rank1.safetensors")
    for k, v in full0.items():
        assert torch.equal(res0[k], v) and torch.equal(res1[k], v), k
    assert [h["loss"] for h in r0["resumed_history"]] == losses

    # hidden-state KD: student and projections identical on both ranks, and as one process trains them
    h0, h1, ref_h = load_file(tmp_path / "hidden-rank0.safetensors"), load_file(tmp_path / "hidden-rank1.safetensors"), _run_hidden()
    assert sum(k.startswith("aux.") for k in h0) == 4
    for k, v in h0.items():
        assert torch.equal(v, h1[k]), k
        torch.testing.assert_close(v, ref_h[k], rtol=0, atol=PARAM_ATOL)
    assert not torch.equal(h0["aux.proj.0.weight"], torch.eye(32))  # the projection did train

    # progress comes from rank 0 alone: 5 + 3 (interrupted in step 4) + 3 (resumed) step lines, not twice that
    import re

    assert len(re.findall(r"step \d/5 \| loss", log)) == 5 + 3 + 3, log[-4000:]
    assert len(re.findall(r"step 3/3 \| loss", log)) == 1  # the hidden-state run


def test_ddp_batch_must_split_evenly_across_ranks():
    import pytest

    from dsk_compress.compress import dist
    from dsk_compress.errors import InvalidArgument

    e = dist.DistEnv(rank=1, world_size=4, local_rank=1)
    with pytest.raises(InvalidArgument, match="batch_size 6 is not divisible by WORLD_SIZE 4"):
        dist.shard_size(6, e)
    x = torch.arange(8 * 3).reshape(8, 3)
    assert torch.equal(dist.shard(x, e), x[2:4])
    parts = [dist.shard({"ids": x}, dist.DistEnv(rank=r, world_size=4))["ids"] for r in range(4)]
    assert torch.equal(torch.cat(parts), x)  # disjoint and complete
    assert dist.shard(x, dist.DistEnv()) is x


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
