"""``distributed: {teacher: fsdp}`` under torchrun: the teacher's weights are sharded across 2 CPU ranks (Gloo, FSDP2),
and the run is the one a single process makes with the whole teacher.

Two launches of ``python -m torch.distributed.run --standalone --nproc_per_node 2``: the CLI on a distill (KD + hidden-state
MSE through the sharded teacher) + Taylor prune (the sharded teacher scores channels) + export recipe; then this file as a
worker that checks the logit cache's collective miss (one rank has a batch cached, the other has not: both must run the
sharded teacher, or the job would hang).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_recipe_ddp import BPB_REL_TOL, WEIGHT_ATOL, _launch, _only_run, _weights

BATCH = 4


@pytest.fixture(scope="module")
def moe_recipe(tmp_path_factory) -> Path:
    import yaml
    from conftest import tiny_mixtral_config
    from transformers import MixtralForCausalLM

    d = tmp_path_factory.mktemp("recipe-fsdp")
    torch.manual_seed(0)
    MixtralForCausalLM(tiny_mixtral_config()).save_pretrained(d / "teacher", safe_serialization=True)
    data = {
        "name": "tiny-fsdp",
        "teacher": {"hf": str(d / "teacher")},
        "student": {"from_teacher": {"layers": [0, 2], "ffn_init": "merge", "calibration_batches": 1}},
        "task": {"name": "code-lm", "seq_len": 32, "eval_sequences": 8},
        "distributed": {"teacher": "fsdp"},
        "stages": [
            {"stage": "distill", "steps": 6, "batch_size": BATCH, "lr": 3e-3, "hidden_mse": 0.5},
            {"stage": "prune", "ffn_ratio": 0.5, "importance": "taylor", "iterations": 1, "steps": 2, "batch_size": BATCH},
            {"stage": "export", "kv_cache": False, "ptq_baselines": False},
        ],
    }
    p = d / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_fsdp_teacher_run_matches_one_process_with_half_the_teacher_per_rank(tmp_path, moe_recipe):
    from dsk_compress import run_recipe

    rc, log = _launch(["-m", "dsk_compress.cli.main", "recipe", str(moe_recipe), "--out", str(tmp_path / "fsdp")], tmp_path / "fsdp.log")
    assert rc == 0, log[-4000:]
    fsdp = _only_run(tmp_path / "fsdp")
    single = run_recipe(str(moe_recipe), out=tmp_path / "single")  # one process: the setting is ignored, the teacher is whole
    m2, m1 = (json.loads((r / "manifest.json").read_text()) for r in (fsdp, single))
    assert m2["status"] == m1["status"] == "done" and m2["world_size"] == 2
    d2, d1 = m2["stages"][0]["metrics"], m1["stages"][0]["metrics"]
    sh = d2["train"]["kd"]["teacher_sharding"]
    assert sh["kind"] == "fsdp" and sh["shards"] == 2
    assert sh["params"] == m1["stages"][2]["outputs"]["artifacts"]["teacher"]["params"]  # the whole teacher, counted by one process
    assert sh["params_on_rank0"] <= 0.52 * sh["params"]  # half, plus FSDP's padding of odd row counts
    assert "teacher_sharding" not in d1["train"]["kd"]
    assert d2["train"]["kd"]["hidden_pairs"] == d1["train"]["kd"]["hidden_pairs"] == [[0, 0], [1, 2]]
    for s2, s1 in zip(m2["stages"][:2], m1["stages"][:2]):
        a, b = s2["metrics"], s1["metrics"]
        assert abs(a["bits_per_byte"] - b["bits_per_byte"]) <= BPB_REL_TOL * b["bits_per_byte"], (s2["stage"], a, b)
        assert a["accuracy"] == b["accuracy"]
    for stage in ("distill", "prune"):  # the Taylor scores through the sharded teacher keep the same channels
        w2, w1 = _weights(fsdp, stage), _weights(single, stage)
        assert {k: v.shape for k, v in w2.items()} == {k: v.shape for k, v in w1.items()}
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL)
    # export (rank 0 alone) wrote the whole teacher, not a shard
    arts = m2["stages"][2]["outputs"]["artifacts"]
    assert arts["teacher"]["params"] == sh["params"] and (fsdp / arts["teacher"]["path"]).is_file()


def test_logit_cache_miss_on_one_rank_runs_the_sharded_teacher_on_both(tmp_path):
    rc, log = _launch([__file__, "cache", str(tmp_path)], tmp_path / "cache.log")
    assert rc == 0, log[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # batch 0: rank 1 had it, rank 0 had not -> both computed it; then both read it
        assert r["first"] == {"hits": 0, "misses": 1} and r["second"] == {"hits": 1, "misses": 1}, r
        assert r["max_value_diff"] < 1e-2  # fp16 storage of logits ~ +-5
        assert r["indices_equal"]


def _cache_worker(out: Path) -> None:
    import copy

    from conftest import tiny_mixtral_config
    from transformers import MixtralForCausalLM

    from dsk_compress.compress import dist
    from dsk_compress.compress.logit_cache import TeacherLogitCache

    e = dist.init()
    torch.manual_seed(0)
    teacher = MixtralForCausalLM(tiny_mixtral_config()).eval()
    sharded = dist.shard_frozen(copy.deepcopy(teacher), torch.device("cpu"))
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))[e.rank * 2 : (e.rank + 1) * 2]
    root = out / "cache"
    if e.rank == 1:  # this rank alone already has batch 0 (a plain cache, whole teacher: no collective)
        TeacherLogitCache(root, teacher, "task", k=8).get(0, x)
    dist.barrier()
    cache = TeacherLogitCache(root, teacher, "task", k=8, online=sharded)
    with torch.no_grad():
        values, indices = cache.get(0, x)
        first = {"hits": cache.hits, "misses": cache.misses}
        cache.get(0, x)
        ref = teacher(input_ids=x, use_cache=False).logits.topk(8, dim=-1)
    (out / f"rank{e.rank}.json").write_text(
        json.dumps(
            {
                "first": first,
                "second": {"hits": cache.hits, "misses": cache.misses},
                "max_value_diff": float((values - ref.values).abs().max()),
                "indices_equal": bool(torch.equal(indices, ref.indices)),
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest
    assert sys.argv[1] == "cache"
    _cache_worker(Path(sys.argv[2]))
