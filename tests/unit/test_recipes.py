"""Recipes: the bundled recipe, ``--set`` overrides and one clear RecipeError per kind of mistake."""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import pytest
import yaml

from dsk_compress.errors import DskError, RecipeError
from dsk_compress.recipes import apply_override, bundled_recipes, load_recipe, recipe_descriptions
from dsk_compress.recipes.schema import STAGE_ORDER, PruneConfig, RecipeSpec

BUNDLED = "quant-prune-distill"


@pytest.fixture(scope="module")
def bundled_dict() -> dict:
    return yaml.safe_load(bundled_recipes()[BUNDLED].read_text())


@pytest.fixture()
def recipe_data(bundled_dict) -> dict:
    """A fresh, modifiable copy of the bundled recipe's YAML content."""
    return copy.deepcopy(bundled_dict)


@pytest.fixture()
def write_recipe(tmp_path):
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(data))
        return p

    return write


def _error(path_or_name, overrides=None) -> RecipeError:
    with pytest.raises(RecipeError) as exc:
        load_recipe(str(path_or_name), overrides)
    return exc.value


# ---- the bundled recipe ---------------------------------------------------------------------------


def test_bundled_recipes_include_quant_prune_distill():
    assert BUNDLED in bundled_recipes()
    assert bundled_recipes()[BUNDLED].is_file()


def test_recipe_descriptions_give_first_line_of_description():
    desc = dict(recipe_descriptions())
    assert desc[BUNDLED].startswith("Distill the code-lm-moe MoE teacher")
    assert "\n" not in desc[BUNDLED]


def test_load_recipe_bundled_returns_stages_in_pipeline_order():
    spec = load_recipe(BUNDLED)
    assert isinstance(spec, RecipeSpec)
    assert spec.name == BUNDLED
    assert [s.stage for s in spec.stages] == ["distill", "prune", "qat", "export", "bench"]
    assert [s.stage for s in spec.stages] == STAGE_ORDER


def test_load_recipe_bundled_keeps_yaml_values():
    import yaml

    from dsk_compress.recipes import bundled_recipes

    raw = yaml.safe_load(bundled_recipes()[BUNDLED].read_text())
    spec = load_recipe(BUNDLED)
    assert spec.teacher.zoo == "code-lm-moe"
    assert spec.student.from_teacher.layers == raw["student"]["from_teacher"]["layers"]
    assert spec.stages[0].steps == raw["stages"][0]["steps"]
    assert spec.stages[0].lr == pytest.approx(raw["stages"][0]["lr"])
    assert isinstance(spec.stages[1], PruneConfig)
    assert spec.stages[1].ffn_ratio == 0.5
    assert spec.stages[4].device == "host-cpu"


def test_gpu_recipe_is_the_cpu_chain_with_gpu_budgets():
    from dsk_compress.recipes.preflight import _check_bench_devices

    gpu, cpu = load_recipe("quant-prune-distill-gpu"), load_recipe(BUNDLED)
    assert [s.stage for s in gpu.stages] == [s.stage for s in cpu.stages] == STAGE_ORDER
    assert gpu.teacher == cpu.teacher and gpu.student == cpu.student and gpu.task == cpu.task
    distill, prune, qat, export, bench = gpu.stages
    assert distill.steps * distill.batch_size * gpu.task.seq_len == 98_304_000  # tens of millions of tokens
    assert distill.baselines == [] and prune.baselines == []
    for g, c in ((prune, cpu.stages[1]), (qat, cpu.stages[2])):
        assert g.steps * g.batch_size >= 10 * c.steps * c.batch_size
    assert {distill.precision, prune.precision, qat.precision} == {"auto"}  # bf16 autocast on CUDA
    assert export.device == bench.device == "gpu-server" and gpu.report.max_accuracy_drop == 2.0
    if platform.machine() in ("x86_64", "AMD64"):
        _check_bench_devices(gpu)  # an x86_64 profile: an x86_64 host without CUDA accepts it (--dry-run works here)


def test_load_recipe_by_path_matches_bundled_name(recipe_data, write_recipe):
    by_path = load_recipe(str(write_recipe(recipe_data)))
    assert by_path.model_dump() == load_recipe(BUNDLED).model_dump()


# ---- --set overrides ------------------------------------------------------------------------------


def test_load_recipe_override_sets_ffn_ratio_to_float():
    spec = load_recipe(BUNDLED, ["stages.1.ffn_ratio=0.4"])
    assert spec.stages[1].ffn_ratio == 0.4
    assert isinstance(spec.stages[1].ffn_ratio, float)


def test_load_recipe_override_does_not_modify_bundled_file():
    load_recipe(BUNDLED, ["stages.1.ffn_ratio=0.4"])
    assert load_recipe(BUNDLED).stages[1].ffn_ratio == 0.5


def test_load_recipe_applies_several_overrides_in_order():
    spec = load_recipe(BUNDLED, ["stages.0.steps=10", "stages.0.steps=20", "seed=7", "stages.-1.runs=3"])
    assert spec.stages[0].steps == 20
    assert spec.seed == 7
    assert spec.stages[4].runs == 3


def test_apply_override_parses_value_as_yaml():
    data = {"a": {"b": 1}, "l": [1, 2]}
    apply_override(data, "a.b=true")
    apply_override(data, "a.c=[1, 2]")
    apply_override(data, "l.0=x=y")
    assert data == {"a": {"b": True, "c": [1, 2]}, "l": ["x=y", 2]}


def test_apply_override_creates_missing_mapping():
    data = {}
    apply_override(data, "report.max_accuracy_drop=5")
    assert data == {"report": {"max_accuracy_drop": 5}}


def test_apply_override_raises_when_list_index_out_of_range(recipe_data):
    with pytest.raises(RecipeError) as exc:
        apply_override(recipe_data, "stages.9.ffn_ratio=0.4")
    assert "stages.9" in exc.value.message
    assert "out of range" in exc.value.message
    assert "5 items" in exc.value.message


def test_apply_override_raises_when_last_index_out_of_range(recipe_data):
    with pytest.raises(RecipeError) as exc:
        apply_override(recipe_data, "stages.5={stage: bench}")
    assert "stages.5" in exc.value.message


def test_apply_override_raises_when_list_index_not_integer(recipe_data):
    with pytest.raises(RecipeError) as exc:
        apply_override(recipe_data, "stages.prune.ffn_ratio=0.4")
    assert "stages.prune" in exc.value.message
    assert "not a list index" in exc.value.message


def test_apply_override_raises_when_equals_missing(recipe_data):
    with pytest.raises(RecipeError) as exc:
        apply_override(recipe_data, "stages.1.ffn_ratio")
    assert "stages.1.ffn_ratio" in exc.value.message
    assert "key.path=value" in exc.value.hint


def test_apply_override_raises_when_descending_into_scalar(recipe_data):
    with pytest.raises(RecipeError) as exc:
        apply_override(recipe_data, "name.x=1")
    assert "name.x" in exc.value.message


def test_load_recipe_raises_when_override_out_of_range():
    err = _error(BUNDLED, ["stages.7.steps=1"])
    assert "stages.7" in err.message


def test_load_recipe_raises_when_override_value_out_of_range():
    err = _error(BUNDLED, ["stages.1.ffn_ratio=1.5"])
    assert "stages.1.ffn_ratio" in err.message


# ---- validation errors ----------------------------------------------------------------------------


def test_load_recipe_raises_unknown_key_when_stage_field_misspelled(recipe_data, write_recipe):
    recipe_data["stages"][1]["ratio"] = 0.3
    err = _error(write_recipe(recipe_data))
    assert "stages.1.ratio" in err.message
    assert "unknown key" in err.message
    # the discriminator tag pydantic adds to the location is dropped
    assert "stages.1.prune" not in err.message


def test_load_recipe_raises_unknown_key_when_top_level_field_misspelled(recipe_data, write_recipe):
    recipe_data["seeed"] = 1
    err = _error(write_recipe(recipe_data))
    assert "seeed: unknown key" in err.message


def test_load_recipe_raises_naming_field_when_type_wrong(recipe_data, write_recipe):
    recipe_data["stages"][0]["steps"] = "many"
    err = _error(write_recipe(recipe_data))
    assert "stages.0.steps" in err.message
    assert "integer" in err.message


def test_load_recipe_raises_naming_field_when_value_out_of_range(recipe_data, write_recipe):
    recipe_data["stages"][1]["ffn_ratio"] = 1.5
    err = _error(write_recipe(recipe_data))
    assert "stages.1.ffn_ratio" in err.message
    assert "less than 1" in err.message


def test_load_recipe_error_is_one_line_when_several_fields_wrong(recipe_data, write_recipe):
    recipe_data["stages"][0]["steps"] = "many"
    recipe_data["stages"][1]["ffn_ratio"] = 1.5
    err = _error(write_recipe(recipe_data))
    assert "stages.0.steps" in err.message and "stages.1.ffn_ratio" in err.message
    assert "\n" not in str(err)


def test_load_recipe_raises_listing_valid_stages_when_stage_unknown(recipe_data, write_recipe):
    recipe_data["stages"][0]["stage"] = "distil"
    err = _error(write_recipe(recipe_data))
    assert "stages.0" in err.message
    assert "unknown stage 'distil'" in err.message
    assert "valid stages: distill, prune, qat, export, bench" in err.message
    # names the bad stage, not the whole stage mapping
    assert "temperature" not in err.message


def test_load_recipe_raises_when_qat_after_export(recipe_data, write_recipe):
    s = recipe_data["stages"]
    recipe_data["stages"] = [s[0], s[1], s[3], s[2], s[4]]
    err = _error(write_recipe(recipe_data))
    assert "'qat' cannot come after 'export'" in err.message
    assert "stages.3" in err.message


def test_load_recipe_raises_when_stage_repeated(recipe_data, write_recipe):
    recipe_data["stages"].insert(1, {"stage": "distill"})
    err = _error(write_recipe(recipe_data))
    assert "second 'distill'" in err.message


def test_load_recipe_raises_when_bench_without_export(recipe_data, write_recipe):
    recipe_data["stages"] = [s for s in recipe_data["stages"] if s["stage"] != "export"]
    err = _error(write_recipe(recipe_data))
    assert "'bench' stage needs an 'export' stage" in err.message


def test_load_recipe_accepts_recipe_without_bench(recipe_data, write_recipe):
    recipe_data["stages"] = recipe_data["stages"][:2]
    spec = load_recipe(str(write_recipe(recipe_data)))
    assert [s.stage for s in spec.stages] == ["distill", "prune"]


def test_load_recipe_raises_when_stages_empty(recipe_data, write_recipe):
    recipe_data["stages"] = []
    err = _error(write_recipe(recipe_data))
    assert "stages" in err.message


def test_load_recipe_raises_when_teacher_has_zoo_and_hf(recipe_data, write_recipe):
    recipe_data["teacher"] = {"zoo": "code-lm-moe", "hf": "/models/teacher"}
    err = _error(write_recipe(recipe_data))
    assert "teacher" in err.message
    assert "exactly one of zoo, hf, torch" in err.message


def test_load_recipe_raises_when_teacher_has_no_source(recipe_data, write_recipe):
    recipe_data["teacher"] = {}
    err = _error(write_recipe(recipe_data))
    assert "teacher" in err.message and "got none" in err.message


def test_load_recipe_raises_when_version_newer(recipe_data, write_recipe):
    recipe_data["version"] = 99
    err = _error(write_recipe(recipe_data))
    assert "version 99" in err.message
    assert "newer" in err.message


# ---- files ----------------------------------------------------------------------------------------


def test_load_recipe_raises_when_path_missing(tmp_path):
    missing = tmp_path / "nope.yaml"
    err = _error(missing)
    assert str(missing) in err.message
    assert BUNDLED in err.hint


def test_load_recipe_raises_listing_bundled_when_name_unknown():
    err = _error("no-such-recipe")
    assert "'no-such-recipe'" in err.message
    assert BUNDLED in err.hint


def test_load_recipe_raises_with_line_when_yaml_invalid(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nstages: [\n  - a: b\n  c\n")
    err = _error(p)
    assert "not valid YAML" in err.message
    assert "line 3" in err.message


def test_load_recipe_raises_when_top_level_not_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    err = _error(p)
    assert "mapping" in err.message


def test_load_recipe_raises_recipe_error_when_file_not_utf8(tmp_path):
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"\xff\xfe\x00bad")
    err = _error(p)
    assert str(p) in err.message


def test_recipe_error_is_a_dsk_error():
    err = _error("no-such-recipe")
    assert isinstance(err, DskError)
