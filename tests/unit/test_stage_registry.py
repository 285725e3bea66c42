"""Stages describe themselves: a toy stage defined in this module alone (config + class) is validated, ordered and run
like a built-in one, and the recipe's order and "stage X needs Y" errors follow from what the stages declare."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from conftest import tiny_llama_recipe
from pydantic import Field

from dsk_compress.errors import RecipeError
from dsk_compress.recipes import load_recipe
from dsk_compress.recipes.base import STAGES, RunContext, Stage, StageConfig, StageResult
from dsk_compress.recipes.schema import STAGE_ORDER, RecipeSpec

BUILT_IN = ["distill", "prune", "qat", "export", "bench"]


class ToyConfig(StageConfig):
    """A stage that reads the latest student and writes a note about it."""

    stage: Literal["toy"] = "toy"
    factor: float = Field(2.0, gt=0, lt=10, description="a number the note repeats")


class ToyStage(Stage[ToyConfig]):
    consumes = ("model",)  # after every stage that makes a student
    provides = ("toy_note",)

    def run(self, ctx: RunContext) -> StageResult:
        note = ctx.stage_dir("toy") / "note.json"
        note.write_text(json.dumps({"factor": self.config.factor, "student": ctx.latest_output("model")}))
        return StageResult(outputs={"toy_note": ctx.rel(note)}, metrics={"factor": self.config.factor})


class NeedsArtifactsConfig(StageConfig):
    stage: Literal["needs-artifacts"] = "needs-artifacts"


class NeedsArtifactsStage(Stage[NeedsArtifactsConfig]):
    requires = ("artifacts",)


@pytest.fixture()
def toy():
    """The toy stages registered for one test, and gone after it (the recipe schema follows both ways)."""
    STAGES.register("toy")(ToyStage)
    STAGES.register("needs-artifacts")(NeedsArtifactsStage)
    yield
    STAGES.unregister("toy")
    STAGES.unregister("needs-artifacts")


def _recipe(tmp_path, stages: list[dict]) -> str:
    return str(tiny_llama_recipe(tmp_path, "toy", stages))


def _error(path: str, overrides=None) -> str:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, overrides)
    return exc.value.message


def test_builtin_stage_order_is_derived_from_declarations():
    assert STAGES.order() == STAGE_ORDER == BUILT_IN
    assert STAGES.providers("model") == ["distill", "prune"]
    assert [n for n in BUILT_IN if STAGES.get(n).repeatable] == ["prune"]


def test_toy_stage_validates_and_names_its_fields_when_registered(toy, tmp_path):
    p = _recipe(tmp_path, [{"stage": "distill", "steps": 0}, {"stage": "toy", "factor": 3}])
    spec = load_recipe(p)
    assert isinstance(spec.stages[1], ToyConfig) and spec.stages[1].factor == 3
    assert spec.model_dump()["stages"][1] == {"stage": "toy", "factor": 3.0}
    msg = _error(p, ["stages.1.factor=20"])
    assert "stages.1.factor: Input should be less than 10" in msg and "stages.1.toy" not in msg
    assert "stages.1.colour: unknown key" in _error(p, ["stages.1.colour=red"])


def test_toy_stage_is_ordered_after_the_stages_whose_outputs_it_consumes(toy, tmp_path):
    assert STAGES.order() == [*BUILT_IN, "toy", "needs-artifacts"]  # ties keep the order of registration
    msg = _error(_recipe(tmp_path, [{"stage": "toy"}, {"stage": "prune"}]))
    assert "stages.1: 'prune' cannot come after 'toy'; order stages as distill -> prune -> qat -> export -> bench -> toy" in msg
    msg = _error(_recipe(tmp_path, [{"stage": "toy"}, {"stage": "toy"}]))
    assert "stages.1: a second 'toy' stage is not supported" in msg
    load_recipe(_recipe(tmp_path, [{"stage": "prune"}, {"stage": "toy"}, {"stage": "qat"}]))  # toy neither feeds nor reads qat


def test_required_output_without_a_provider_names_the_stage_that_provides_it(toy, tmp_path):
    msg = _error(_recipe(tmp_path, [{"stage": "distill"}, {"stage": "needs-artifacts"}]))
    assert "a 'needs-artifacts' stage needs an 'export' stage before it" in msg
    load_recipe(_recipe(tmp_path, [{"stage": "export"}, {"stage": "needs-artifacts"}]))


def test_unregistered_toy_stage_is_unknown_again(toy, tmp_path):
    p = _recipe(tmp_path, [{"stage": "toy"}])
    load_recipe(p)
    STAGES.unregister("toy")
    try:
        assert "stages.0: unknown stage 'toy'; valid stages: distill, prune, qat, export, bench, needs-artifacts" in _error(p)
    finally:
        STAGES.register("toy")(ToyStage)


def test_unknown_stage_lists_the_registered_ones(toy, tmp_path):
    msg = _error(_recipe(tmp_path, [{"stage": "toys"}]))
    assert "unknown stage 'toys'; valid stages: " in msg and "toy" in msg.split("valid stages: ")[1]


def test_recipe_with_toy_stage_runs_and_resumes(toy, tmp_path):
    from dsk_compress import run_recipe

    spec = load_recipe(_recipe(tmp_path, [{"stage": "toy", "factor": 4}]))
    rd = run_recipe(spec, out=tmp_path / "runs")
    manifest = json.loads((rd / "manifest.json").read_text())
    (entry,) = manifest["stages"]
    assert entry["stage"] == "toy" and entry["status"] == "done" and entry["outputs"] == {"toy_note": "toy/note.json"}
    assert json.loads((rd / "toy" / "note.json").read_text()) == {"factor": 4.0, "student": None}
    assert RecipeSpec.model_validate(manifest["recipe"]).stages[0].factor == 4
    assert run_recipe(spec, out=tmp_path / "runs", resume=True) == rd  # done: skipped


def test_registering_a_stage_checks_its_declarations():
    class Untagged(StageConfig):
        pass

    class BadStage(Stage[Untagged]):
        pass

    with pytest.raises(ValueError, match="needs `stage: Literal\\['bad'\\] = 'bad'`"):
        STAGES.register("bad")(BadStage)

    class Plain(Stage):
        pass

    with pytest.raises(ValueError, match="declare its config"):
        STAGES.register("plain")(Plain)

    class Tagged(StageConfig):
        stage: Literal["strs"] = "strs"

    class StrStage(Stage[Tagged]):
        provides = "model"

    with pytest.raises(ValueError, match="tuple of output names"):
        STAGES.register("strs")(StrStage)
    with pytest.raises(ValueError, match="already registered"):
        STAGES.register("prune")(ToyStage)
    assert STAGES.order() == BUILT_IN
