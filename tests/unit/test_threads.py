"""Torch CPU threads: physical cores counted from the topology, the precedence --threads > recipe > OMP_NUM_THREADS >
physical cores, bounds refused in one line, the count set during a run, recorded in the manifest and the zoo card, and a
resume with other threads accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, run_main, tiny_llama_recipe

from dsk_compress.errors import RecipeError
from dsk_compress.recipes.limits import max_threads
from dsk_compress.threads import (
    ThreadChoice,
    apply_threads,
    choose_threads,
    logical_cpus,
    omp_num_threads,
    physical_cores,
    restore_threads,
)

# 2 packages x 2 cores x 2 hyper-threads: cpu N is package N // 4, core (N // 2) % 2; the core ids repeat per package
TOPOLOGY = {cpu: (cpu // 4, (cpu // 2) % 2) for cpu in range(8)}


def _sysfs(root: Path, topology: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in topology.items():
        t = root / f"cpu{cpu}" / "topology"
        t.mkdir(parents=True)
        (t / "physical_package_id").write_text(f"{package}\n")
        (t / "core_id").write_text(f"{core}\n")
    (root / "cpufreq").mkdir()  # other entries of /sys/devices/system/cpu are not CPUs
    return root


def _cpuinfo(path: Path, topology: dict[int, tuple[int, int]], with_cores: bool = True) -> Path:
    blocks = []
    for cpu, (package, core) in topology.items():
        lines = [f"processor\t: {cpu}", "model name\t: Fake CPU"]
        if with_cores:
            lines += [f"physical id\t: {package}", "siblings\t: 4", f"core id\t\t: {core}"]
        blocks.append("\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def test_physical_cores_counts_package_core_pairs_in_sysfs(tmp_path):
    sysfs = _sysfs(tmp_path / "cpu", TOPOLOGY)
    missing = tmp_path / "no-cpuinfo"
    assert physical_cores(sysfs, missing, cpus=set(range(8))) == 4  # hyper-threads not counted, core ids per package
    assert physical_cores(sysfs, missing, cpus={0, 1}) == 1  # two threads of one core
    assert physical_cores(sysfs, missing, cpus={0, 2, 4, 5}) == 3  # the affinity mask limits what is counted


def test_physical_cores_reads_cpuinfo_when_sysfs_has_no_topology(tmp_path):
    info = _cpuinfo(tmp_path / "cpuinfo", TOPOLOGY)
    assert physical_cores(tmp_path / "no-sysfs", info, cpus=set(range(8))) == 4
    assert physical_cores(tmp_path / "no-sysfs", info, cpus={1, 3, 6}) == 3


def test_physical_cores_falls_back_to_the_logical_count_without_core_ids(tmp_path):
    info = _cpuinfo(tmp_path / "cpuinfo", TOPOLOGY, with_cores=False)  # some ARM kernels and VMs
    assert physical_cores(tmp_path / "no-sysfs", info, cpus=set(range(6))) == 6


def test_physical_cores_of_this_machine_is_between_one_and_its_logical_cpus():
    assert 1 <= physical_cores() <= logical_cpus()


@pytest.mark.parametrize(("value", "expected"), [("4", 4), ("4,2", 4), (" 3 ", 3), ("", None), ("abc", None), ("0", None), ("-2", None)])
def test_omp_num_threads_reads_a_positive_first_level(value, expected):
    assert omp_num_threads({"OMP_NUM_THREADS": value}) == expected
    assert omp_num_threads({}) is None


def test_choose_threads_precedence_is_cli_then_recipe_then_omp_then_physical_cores():
    omp = {"OMP_NUM_THREADS": "3"}
    assert (choose_threads(1, 2, omp).torch_threads, choose_threads(1, 2, omp).source) == (1, "--threads")
    assert (choose_threads(None, 2, omp).torch_threads, choose_threads(None, 2, omp).source) == (2, "recipe")
    assert (choose_threads(None, None, omp).torch_threads, choose_threads(None, None, omp).source) == (3, "OMP_NUM_THREADS")
    c = choose_threads(None, None, {})
    assert (c.torch_threads, c.source) == (physical_cores(), "physical cores")
    assert (c.physical_cores, c.logical_cpus) == (physical_cores(), logical_cpus())
    assert c.describe() == f"threads: {physical_cores()} (physical cores; --threads to change)"
    assert choose_threads(2, None, {}).describe() == "threads: 2 (--threads)"


def test_choose_threads_refuses_counts_out_of_bounds():
    with pytest.raises(RecipeError, match=f"--threads {max_threads() + 1} is out of range"):
        choose_threads(max_threads() + 1, None, {})
    with pytest.raises(RecipeError, match="--threads 0 is out of range"):
        choose_threads(0, None, {})
    assert choose_threads(max_threads(), None, {}).torch_threads == max_threads()


def test_apply_threads_sets_torch_and_restore_sets_it_back():
    before = torch.get_num_threads()
    old = apply_threads(ThreadChoice(1 if before != 1 else 2, "--threads", 1, 1))
    try:
        assert old == before and torch.get_num_threads() == (1 if before != 1 else 2)
    finally:
        restore_threads(old)
    assert torch.get_num_threads() == before


def test_recipe_threads_field_is_bounded_like_bench_threads():
    from dsk_compress.recipes import load_recipe

    assert load_recipe("quant-prune-distill", [f"threads={max_threads()}"]).threads == max_threads()
    assert load_recipe("quant-prune-distill").threads is None
    with pytest.raises(RecipeError, match="threads"):
        load_recipe("quant-prune-distill", [f"threads={max_threads() + 1}"])
    with pytest.raises(RecipeError, match="threads"):
        load_recipe("quant-prune-distill", ["threads=0"])


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    return tiny_llama_recipe(
        tmp_path_factory.mktemp("threads"), "tiny-threads", [{"stage": "distill", "steps": 1, "batch_size": 2, "lr": 1e-3}]
    )


def test_threads_out_of_bounds_is_a_one_line_error(tiny_recipe, capsys):
    code, _, err = run_main(["recipe", str(tiny_recipe), "--dry-run", "--threads", str(max_threads() + 1)], capsys)
    assert f"--threads {max_threads() + 1} is out of range" in one_line_error(code, err)
    code, _, err = run_main(["recipe", str(tiny_recipe), "--dry-run", "--set", f"threads={max_threads() + 1}"], capsys)
    assert "threads" in one_line_error(code, err)
    code, _, err = run_main(["zoo", "train", "code-lm-moe", "--threads", str(max_threads() + 1), "--no-install"], capsys)
    assert f"--threads {max_threads() + 1} is out of range" in one_line_error(code, err)


def test_dry_run_prints_the_threads_and_their_source(tiny_recipe, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code, out, err = run_main(["recipe", str(tiny_recipe), "--dry-run"], capsys)
    assert code == 0, err
    assert f"threads: {physical_cores()} (physical cores; --threads to change)" in out
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, out, err = run_main(["recipe", str(tiny_recipe), "--dry-run", "--set", "threads=2"], capsys)
    assert code == 0 and "threads: 2 (recipe; --threads to change)" in out


def test_run_sets_threads_records_them_and_resumes_with_other_threads(tiny_recipe, tmp_path, capsys, monkeypatch):
    import dsk_compress.recipes.runner as runner

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    seen = []
    orig = runner._run_stages

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return orig(*a, **k)

    monkeypatch.setattr(runner, "_run_stages", spy)
    before = torch.get_num_threads()
    code, out, err = run_main(["recipe", str(tiny_recipe), "--out", str(tmp_path), "--threads", "1"], capsys)
    assert code == 0, err[-3000:]
    assert out.startswith("threads: 1 (--threads)\n") and "threads" not in err
    assert seen == [1] and torch.get_num_threads() == before  # set for the run, set back after it
    (rd,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    m = json.loads((rd / "manifest.json").read_text())
    assert m["threads"] == {"torch_threads": 1, "source": "--threads", "physical_cores": physical_cores(), "logical_cpus": logical_cpus()}

    # threads are no part of the run's identity: a resume under other threads (the recipe field, here) is accepted
    code, out, err = run_main(["recipe", str(tiny_recipe), "--run-dir", str(rd), "--resume", "--set", "threads=2"], capsys)
    assert code == 0, err[-3000:]
    assert out.startswith("threads: 2 (recipe; --threads to change)\n")
    m = json.loads((rd / "manifest.json").read_text())
    assert m["status"] == "done" and m["threads"]["torch_threads"] == 2 and m["threads"]["source"] == "recipe"
    code, _, err = run_main(["recipe", str(tiny_recipe), "--run-dir", str(rd), "--resume", "--set", "seed=1"], capsys)
    assert "the recipe differs" in one_line_error(code, err)  # what does change results still must match


def test_zoo_train_records_its_threads_on_the_card(tmp_path, monkeypatch):
    import dsk_compress.models.zoo as zoo
    from dsk_compress.models.zoo import ZooSpec, train_zoo

    tiny = ZooSpec(
        name="tiny-moe",
        description="a tiny Mixtral for tests",
        model_type="mixtral",
        config=dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_local_experts=2,
            num_experts_per_tok=1,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        ),
        steps=1,
        batch_size=2,
        lr=2e-3,
        warmup=0,
    )
    monkeypatch.setitem(zoo.ZOO._items, tiny.name, tiny)
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    monkeypatch.setenv("DSK_COMPRESS_CACHE", str(tmp_path / "cache"))
    stdlib = tmp_path / "lib" / "python3.9"
    for i in range(40):
        p = stdlib / f"pkg{i // 10}" / f"mod_{i:02d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40)))
    card = train_zoo("tiny-moe", work_dir=tmp_path / "w", steps=1, install=False, stdlib_root=stdlib, threads=1)
    assert card["training"]["threads"] == {
        "torch_threads": 1,
        "source": "--threads",
        "physical_cores": physical_cores(),
        "logical_cpus": logical_cpus(),
    }
