"""Hostile and broken inputs end in one clear line and exit code 2, checked before any work.

Each case here was found by a tester (issue 13): unsafe run names, YAML alias bombs and deep nesting,
out-of-range and non-finite numbers, cross-field rules, device names, missing checkpoints, models whose
weights or attention shapes do not fit their config, tokenizers that do not fit the model, text files
that are JSON or not UTF-8, and the CLI's own paths (``--out`` a file, unwritable). The entry point is
``dsk_compress.cli.main.main`` (exit code and stderr exactly as a shell sees them).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import one_line_error, run_main

from dsk_compress.errors import DskError, InvalidArgument, ModelSourceError, RecipeError, TaskError


def dry(capsys, *sets: str, recipe: str = "quant-prune-distill") -> str:
    args = ["recipe", recipe, "--dry-run"]
    for s in sets:
        args += ["--set", s]
    return one_line_error(*run_main(args, capsys)[::2])


# ---- names, numbers, NaN, cross-field rules ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escape", "a/b", "x\ny", "", "bad\x00name", ".hidden", "a..b", "n" * 101, "C:\\\\x"])
def test_unsafe_run_name_is_refused_at_dry_run(capsys, name):
    line = dry(capsys, f"name={json.dumps(name)}")
    assert "name:" in line and ("safe run name" in line or "string" in line)


@pytest.mark.parametrize(
    "assignment, field",
    [
        ("seed=4294967296", "seed"),
        ("seed=-1", "seed"),
        ("seed=1.0e+30", "seed"),
        ("version=0", "version"),
        ("version=-5", "version"),
        ("stages.0.steps=10000001", "stages.0.steps"),
        ("stages.0.batch_size=10000000", "stages.0.batch_size"),
        ("task.eval_sequences=10000000000", "task.eval_sequences"),
        ("student.from_teacher.intermediate_size=10000000", "intermediate_size"),
        ("stages.4.threads=1000000", "stages.4.threads"),
        ("stages.0.temperature=.inf", "stages.0.temperature"),
        ("stages.0.lr=.nan", "stages.0.lr"),
        ("stages.3.qdq_min_sqnr_db=.nan", "stages.3.qdq_min_sqnr_db"),
        ("report.max_accuracy_drop=.inf", "report.max_accuracy_drop"),
        ("stages.1.ffn_ratio=-.inf", "stages.1.ffn_ratio"),
    ],
)
def test_out_of_range_or_non_finite_number_is_refused_naming_the_field(capsys, assignment, field):
    assert field in dry(capsys, assignment)


def test_threads_are_bounded_by_this_machines_cpus():
    from dsk_compress.recipes import load_recipe
    from dsk_compress.recipes.limits import max_threads

    assert max_threads() == 4 * (os.cpu_count() or 1)
    assert load_recipe("quant-prune-distill", [f"stages.4.threads={max_threads()}"]).stages[4].threads == max_threads()
    with pytest.raises(RecipeError, match="threads"):
        load_recipe("quant-prune-distill", [f"stages.4.threads={max_threads() + 1}"])


def test_layers_with_keep_every_is_refused(capsys):
    assert "give layers or keep_every, not both" in dry(capsys, "student.from_teacher.keep_every=2")


def test_head_ratio_alone_prunes_no_ffn_channels():
    from dsk_compress.recipes.schema import PruneConfig

    assert PruneConfig(head_ratio=0.3).effective_ffn_ratio == 0.0
    assert PruneConfig().effective_ffn_ratio == 0.5
    assert PruneConfig(head_ratio=0.3, ffn_ratio=0.4).effective_ffn_ratio == 0.4


@pytest.mark.parametrize("field", ["stages.4.device", "stages.3.device"])
def test_unknown_device_is_refused_at_dry_run(capsys, field):
    line = dry(capsys, f"{field}=nope")
    assert field in line and "unknown device 'nope'" in line and "rpi5" in line


def test_bad_task_name_lists_the_tasks_not_the_stages(capsys):
    line = dry(capsys, "task.name=bogus")
    assert "unknown task 'bogus'" in line and "code-lm, text-lm" in line and "stage" not in line


def test_checkpoint_of_a_zoo_teacher_is_refused_and_a_torch_checkpoint_must_exist(capsys, tmp_path):
    assert "checkpoint goes with torch" in dry(capsys, "teacher.checkpoint=weights.safetensors")
    line = dry(
        capsys,
        f"teacher.checkpoint={tmp_path / 'missing.safetensors'}",
        f"student.checkpoint={tmp_path / 'missing.safetensors'}",
        recipe=str(Path(__file__).resolve().parents[2] / "examples" / "digits" / "recipe.yaml"),
    )
    assert "teacher.checkpoint" in line and "does not exist" in line


def test_logit_cache_top_k_above_the_vocabulary_is_refused(capsys):
    line = dry(capsys, "logit_cache.enabled=true", "logit_cache.top_k=300")
    assert "logit_cache.top_k 300" in line and "256" in line


def test_memory_estimate_refuses_what_cannot_fit_and_names_both_figures(capsys):
    line = dry(capsys, "stages.0.batch_size=65536")
    assert "stages.0 (distill, batch_size 65536) needs about" in line and "GiB" in line and "this machine has" in line
    assert "needs about" in dry(capsys, "student.from_teacher.intermediate_size=1000000")
    assert "needs about" in dry(capsys, "task.eval_sequences=1000000", "task.seq_len=4096")


def test_dry_run_prints_the_memory_estimate(capsys):
    code, out, err = run_main(["recipe", "quant-prune-distill", "--dry-run"], capsys)
    assert code == 0, err
    assert "memory: about" in out and "this machine has" in out


def test_student_layer_the_teacher_lacks_is_refused_at_dry_run(capsys):
    assert "student.from_teacher.layers: [9] out of range" in dry(capsys, "student.from_teacher.layers=[0, 9]")


@pytest.mark.parametrize(
    "override",
    [
        "a.b.c=",
        "=5",
        "stages..steps=3",
        "stages.99999999999999999999.steps=1",
        "x" * 300 + "=1",
        ".".join(["k"] * 40) + "=1",
        "stages.0.steps=" + "9" * 5000,
    ],
)
def test_odd_overrides_give_one_line(capsys, override):
    dry(capsys, override)


# ---- YAML limits ---------------------------------------------------------------------------------------------------

BOMB = "\n".join([f"a0: &a0 [{', '.join(['lol'] * 9)}]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\n"


def test_alias_bomb_is_refused_in_milliseconds(capsys, tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB)
    assert len(BOMB) < 500
    t0 = time.perf_counter()
    line = one_line_error(*run_main(["recipe", str(p), "--dry-run"], capsys)[::2])
    assert time.perf_counter() - t0 < 5  # the unguarded loader took 47 s and 1.4 GB
    assert "aliases" in line or "once its aliases are expanded" in line


@pytest.mark.parametrize(
    "text", ["[" * 50_000 + "]" * 50_000, "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 200)), "{a: " * 30_000 + "1" + "}" * 30_000]
)
def test_deep_nesting_is_refused_without_recursion_error(capsys, tmp_path, text):
    p = tmp_path / "deep.yaml"
    p.write_text(text)
    assert "nested deeper than 64" in one_line_error(*run_main(["recipe", str(p), "--dry-run"], capsys)[::2])


def test_safe_load_counts_expanded_aliases_and_keeps_ordinary_aliases():
    from dsk_compress.safe_yaml import YAMLLimitError, safe_load

    assert safe_load("x: &x {a: 1}\ny: *x") == {"x": {"a": 1}, "y": {"a": 1}}
    with pytest.raises(YAMLLimitError, match="aliases"):
        safe_load("a: &a [1]\nb: [" + ", ".join(["*a"] * 101) + "]")
    with pytest.raises(YAMLLimitError, match="4300 digits|cannot be read"):
        safe_load("a: " + "1" * 5000)
    assert safe_load("a: '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[['  # [[[[[[[[[[[[[[[[[") == {
        "a": "[" * 74
    }


def test_alias_bomb_in_a_set_value_is_refused(capsys):
    flow = "{" + ", ".join(BOMB.strip().splitlines()) + "}"
    line = dry(capsys, "description=" + flow)
    assert "--set description: the value is refused" in line and "aliases" in line


# ---- models, tokenizers and data that look fine but are not ------------------------------------------------------


def _save_llama(d: Path, **kw) -> Path:
    from conftest import tiny_llama

    from dsk_compress.models.hf import save_hf_dir

    return save_hf_dir(tiny_llama(**kw), d)  # quiet: transformers 5 prints "Writing model shards" to stderr


def test_hf_model_whose_weights_lack_tensors_is_refused_naming_them(tmp_path):
    from safetensors.torch import load_file, save_file

    from dsk_compress.models.source import load_hf_dir

    d = _save_llama(tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    keep = {k: v for k, v in sd.items() if "layers.1." not in k}
    save_file(keep, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=r"lack \d+ tensor\(s\) of its config: model\.layers\.1\."):
        load_hf_dir(d)


def test_hf_config_whose_width_does_not_divide_into_heads_is_refused(tmp_path, capsys):
    from dsk_compress.models.source import load_hf_dir

    d = _save_llama(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    for bad, msg in (
        ({"hidden_size": 66, "head_dim": None}, "hidden_size 66 is not divisible by num_attention_heads 4"),
        ({"num_key_value_heads": 3}, "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    ):
        (d / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ModelSourceError, match=msg):
            load_hf_dir(d)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            json.dumps(
                {"name": "x", "teacher": {"zoo": "code-lm-moe"}, "student": {"hf": str(d)}, "stages": [{"stage": "distill", "steps": 1}]}
            )
        )
        assert msg in one_line_error(*run_main(["recipe", str(recipe), "--dry-run"], capsys)[::2])


def test_tokenizer_far_smaller_than_the_vocabulary_is_refused():
    from types import SimpleNamespace

    from dsk_compress.compress.distill import check_vocab

    cfg = SimpleNamespace(vocab_size=2000)
    with pytest.raises(InvalidArgument, match="1500 tokens but the teacher's vocab_size is 2000"):
        check_vocab(cfg, task_vocab=1500)
    check_vocab(cfg, task_vocab=1950)  # padding to a multiple of 64/128 is normal
    check_vocab(SimpleNamespace(vocab_size=151_936), task_vocab=151_665)  # Qwen2's padded embedding


def test_text_files_are_read_by_format_not_as_plain_text(tmp_path):
    from dsk_compress.tasks.text_lm import read_documents

    rec = [{"text": "alpha"}, {"text": "beta"}]
    (tmp_path / "a.JSONL").write_text("\n".join(json.dumps(r) for r in rec))
    (tmp_path / "b.json").write_text(json.dumps(rec))
    (tmp_path / "c.txt").write_text(json.dumps(rec[0]) + "\n")
    (tmp_path / "d.txt").write_text("[Verse 1] plain text\n")
    assert read_documents([str(tmp_path / "a.JSONL")]) == ["alpha", "beta"]
    assert read_documents([str(tmp_path / "b.json")]) == ["alpha", "beta"]
    with pytest.raises(TaskError, match="holds JSON but would be read as plain text"):
        read_documents([str(tmp_path / "c.txt")])
    assert read_documents([str(tmp_path / "c.txt")], fmt="jsonl") == ["alpha"]
    assert read_documents([str(tmp_path / "c.txt")], fmt="text") == [json.dumps(rec[0]) + "\n"]
    assert read_documents([str(tmp_path / "d.txt")]) == ["[Verse 1] plain text\n"]


def test_text_decoding_error_names_file_and_line_with_encoding_hint(tmp_path):
    from dsk_compress.tasks.text_lm import read_documents

    p = tmp_path / "latin.txt"
    p.write_bytes("line one\nline two caf\xe9\n".encode("latin-1"))
    with pytest.raises(TaskError) as e:
        read_documents([str(p)])
    assert f"{p}:2:" in e.value.message and "encoding" in e.value.hint
    assert read_documents([str(p)], encoding="latin-1") == ["line one\nline two caf\xe9\n"]


def test_unknown_text_encoding_is_refused_at_load():
    from dsk_compress.recipes.schema import TextTaskSpec

    with pytest.raises(ValueError, match="unknown encoding 'utf-99'"):
        TextTaskSpec(name="text-lm", train=["a"], eval=["b"], tokenizer="t", encoding="utf-99")


def test_teacher_near_chance_or_below_a_student_is_flagged():
    from dsk_compress.sanity import flag_teacher_rows, teacher_warning

    assert teacher_warning(5.0, 4.0) and "near chance" in teacher_warning(5.0, 4.0)
    assert teacher_warning(54.8, 4.0) is None
    assert "below a student" in teacher_warning(50.0, 4.0, best_student=63.0)
    rows = [{"name": "teacher", "role": "teacher", "accuracy": 5.1, "notes": ""}, {"name": "final", "role": "final", "accuracy": 18.0}]
    flag_teacher_rows(rows, 4.0)
    assert rows[0]["notes"].startswith("WARNING: the teacher scores 5.10%, near chance (4.00%")


def test_chance_accuracy_is_the_most_frequent_target_share():
    import numpy as np

    from dsk_compress.sanity import chance_accuracy

    class Windows:
        _eval_starts = np.arange(2)

        def eval_batches(self, n):
            yield np.array([[9, 1, 1, 1, 2], [9, 1, 2, 2, 2]])

    assert chance_accuracy(Windows()) == pytest.approx(50.0)
    assert chance_accuracy(object()) is None


# ---- the CLI's paths -----------------------------------------------------------------------------------------------


def test_out_or_run_dir_that_is_a_file_gives_one_line(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quant-prune-distill.yaml"
    for args in (
        ["--out", str(f)],
        ["--out", str(f / "sub")],
        ["--run-dir", str(f)],
        ["--run-dir", str(f), "--resume"],
        ["--out", str(f), "--resume"],
    ):
        line = one_line_error(*run_main(["recipe", str(recipe), *args], capsys)[::2])
        assert str(f) in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_gives_one_line(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = one_line_error(*run_main(["recipe", "quant-prune-distill", "--out", str(ro / "runs")], capsys)[::2])
        assert "cannot create --out" in line or "not writable" in line
    finally:
        ro.chmod(0o700)


def test_unwritable_out_gives_one_line_even_as_root(capsys, tmp_path):
    """A read-only bind is not available to tests; /proc is a filesystem nobody can create folders in."""
    line = one_line_error(*run_main(["recipe", "quant-prune-distill", "--out", "/proc/dsk-compress-runs"], capsys)[::2])
    assert "cannot create --out /proc/dsk-compress-runs" in line


def test_resume_without_manifest_names_the_run_dir(capsys, tmp_path):
    line = one_line_error(*run_main(["recipe", "quant-prune-distill", "--run-dir", str(tmp_path / "x"), "--resume"], capsys)[::2])
    assert str(tmp_path / "x") in line and "no manifest.json" in line


def test_resume_picks_its_run_by_manifest_name_not_prefix(tmp_path):
    from dsk_compress.recipes.runner import latest_run

    for name, folder in (
        ("tiny-edge", "tiny-edge-20261101-000000"),
        ("tiny-edge-jetson", "tiny-edge-jetson-20261201-000000"),
        ("other", "tiny-edge-20261102-000000"),
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "manifest.json").write_text(json.dumps({"name": name, "stages": []}))
    assert latest_run(tmp_path, "tiny-edge") == tmp_path / "tiny-edge-20261101-000000"
    assert latest_run(tmp_path, "tiny-edge-jetson") == tmp_path / "tiny-edge-jetson-20261201-000000"
    assert latest_run(tmp_path, "tiny") is None


def test_export_out_that_is_a_file_gives_one_line(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    line = one_line_error(*run_main(["export", str(tmp_path), "--device", "rpi5", "--out", str(f)], capsys)[::2])
    assert "is a file" in line


def test_dsk_errors_with_newlines_still_print_one_line(capsys, monkeypatch):
    import dsk_compress.api

    def boom(*a, **k):
        raise DskError("first\nsecond", hint="third\nfourth")

    monkeypatch.setattr(dsk_compress.api, "load_recipe", boom)
    assert one_line_error(*run_main(["recipe", "x", "--dry-run"], capsys)[::2]) == "error: first second (hint: third fourth)"


def test_task_tokenizer_other_than_the_one_in_the_teachers_folder_is_refused():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dsk_compress.compress.distill import check_vocab

    def bpe(texts):
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")

    from dsk_compress.tasks.code_lm import stdlib_files

    texts = [p.read_text(errors="ignore")[:3000] for _, p in stdlib_files()[:40]]
    teachers, other = bpe(texts[:20]), bpe(texts[20:])
    assert len(teachers) == len(other) == 300  # same size, other token -> id maps
    cfg = SimpleNamespace(vocab_size=len(teachers))
    check_vocab(cfg, task_tokenizer=teachers, teacher_tokenizer=teachers)
    with pytest.raises(InvalidArgument, match="maps tokens to other ids than the teacher's tokenizer"):
        check_vocab(cfg, task_tokenizer=other, teacher_tokenizer=teachers)
