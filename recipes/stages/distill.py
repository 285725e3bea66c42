"""The distill stage: cut a dense student from the teacher (or load the recipe's student), train it with KD, save it.

Story: check that the task's tokens are the teacher's and that the KD settings fit together; build the
student (layers taken from the teacher, FFN initialised from its experts; see ``compress/student.py``),
saved as ``distill/init`` so a resumed run restarts from the very same initialisation; measure it; train
it with logit KD + hard-label CE (+ optional hidden-state MSE; ``compress/distill.py``); save
``distill/model``. Then the optional baselines (``nokd``, ``random-init``, ``random-init-nokd``): the same
token budget with one of (initialisation, KD) changed, so the report can show what each one buys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from dsk_compress.io import read_json
from dsk_compress.recipes.base import STAGES, RunContext, Stage, StageConfig, StageResult
from dsk_compress.recipes.stages.common import _TrainSettings, check_kd_settings, evaluate, kd_train, stage_field, train_summary


class DistillConfig(StageConfig, _TrainSettings):
    stage: Literal["distill"] = "distill"
    hidden_mse: float = Field(
        0.0, ge=0, le=1e6, description="weight of the hidden-state MSE (projected student layer vs teacher layer; online teacher only)"
    )
    hidden_pairs: list[tuple[int, int]] | None = Field(
        None,
        description="[[student_layer, teacher_layer], ...] for hidden_mse (default: each student layer and the teacher layer it was cut from)",
    )
    baselines: list[Literal["nokd", "random-init", "random-init-nokd"]] = Field(
        default_factory=list,
        description="also train, on the same token budget: the same student without KD (nokd), a KD student with random FFN init "
        "(random-init), and a random-FFN student without KD (random-init-nokd)",
    )


@STAGES.register("distill")
class DistillStage(Stage[DistillConfig]):
    """Cut a dense student from the teacher and train it with logit KD + hard-label CE (+ optional hidden-state MSE)."""

    provides = ("model",)  # distill/model, the student every later stage starts from

    def uses_teacher(self, spec) -> bool:
        return True  # it cuts the student from the teacher, and fills the logit cache

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.compress import dist
        from dsk_compress.compress.distill import check_vocab
        from dsk_compress.compress.student import build_student
        from dsk_compress.models.source import count_params, load_hf_dir, load_model_source, save_hf_dir
        from dsk_compress.sanity import teacher_warning

        d = ctx.stage_dir("distill")
        check_kd_settings(ctx, self.config, "distill")
        teacher = ctx.teacher()
        self._check_task_vocab(ctx, teacher)
        st = ctx.spec.student
        init_dir = d / "init"
        info: dict = {}
        dist.init()  # under torchrun every rank builds the same student; rank 0 alone writes files
        if dist.broadcast_object((init_dir / "config.json").is_file()):
            student = load_hf_dir(init_dir)  # resume: the very same initialisation
            info = read_json(init_dir / "dsk_compress.json") if (init_dir / "dsk_compress.json").is_file() else {}
        elif st.from_teacher is not None:
            ft = st.from_teacher
            student, info = build_student(
                teacher,
                layers=ft.layers,
                keep_every=ft.keep_every,
                intermediate_size=ft.intermediate_size,
                ffn_init=ft.ffn_init,
                calibration=ctx.task.calibration_batches(ft.calibration_batches),
                seed=ctx.spec.seed,
            )
            if dist.is_main():
                save_hf_dir(student, init_dir, extra=info)
        else:
            student = load_model_source(st.model_dump(exclude_none=True, exclude={"from_teacher"}))
        check_vocab(teacher.config, student.config)
        pairs = self._hidden_pairs(ctx, student, teacher, info)
        init_metrics = evaluate(ctx, student)
        teacher_check = self._check_teacher(ctx, teacher)
        del teacher  # with the logit cache, kd_train releases it once its batches are cached: this reference must not keep it
        res = kd_train(ctx, student, self.config, "distill", d / "checkpoint", hidden_pairs=pairs)
        metrics = {
            "init": init_metrics,
            "student_init": info,
            "teacher": teacher_check,
            "params": count_params(student),
            "train": train_summary(res),
            **evaluate(ctx, student),
        }
        teacher_check["warning"] = teacher_warning(teacher_check["accuracy"], teacher_check["chance_accuracy"], metrics["accuracy"])
        if dist.is_main():
            save_hf_dir(student, d / "model")
        dist.barrier()
        baselines = {}
        for name in self.config.baselines:
            baselines[name], metrics[f"baseline_{name}"] = self._baseline(ctx, name, init_dir, d / "baselines" / name)
        return StageResult(outputs={"model": ctx.rel(d / "model"), "baselines": baselines}, metrics=metrics)

    def _check_teacher(self, ctx: RunContext, teacher) -> dict:
        """The teacher's accuracy on the task next to chance; a teacher near chance is announced now and flagged in the report."""
        import sys

        from dsk_compress.compress import dist
        from dsk_compress.sanity import chance_accuracy, teacher_warning

        acc = evaluate(ctx, teacher)["accuracy"]
        chance = chance_accuracy(ctx.task)
        warning = teacher_warning(acc, chance)
        if warning and dist.is_main():
            print(warning, file=sys.stderr)
        return {"accuracy": acc, "chance_accuracy": chance, "warning": warning}

    def _check_task_vocab(self, ctx: RunContext, teacher) -> None:
        """The task's tokens must be the teacher's tokens: size, special-token ids, and the teacher directory's own tokenizer."""
        from dsk_compress.compress.distill import check_vocab

        tok = getattr(ctx.task, "tok", None)
        teacher_tok = None
        tdir = ctx.spec.teacher.hf
        if (
            tok is not None
            and tdir
            and any((Path(tdir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        ):
            if Path(tdir).resolve() != Path(getattr(ctx.spec.task, "tokenizer", "")).resolve():
                from dsk_compress.tasks.text_lm import load_tokenizer

                teacher_tok = load_tokenizer(tdir)
        check_vocab(teacher.config, task_tokenizer=tok, teacher_tokenizer=teacher_tok, task_vocab=getattr(ctx.task, "vocab_size", None))

    def _hidden_pairs(self, ctx: RunContext, student, teacher, info: dict) -> list | None:
        """``hidden_pairs`` as given, or each student layer with the teacher layer it was cut from; checked against both models."""
        from dsk_compress.compress.distill import check_hidden_pairs
        from dsk_compress.errors import RecipeError

        c = self.config
        if c.hidden_mse <= 0:
            return None
        field = stage_field(ctx, "distill", "hidden_pairs")
        if c.hidden_pairs is not None:
            pairs = [tuple(p) for p in c.hidden_pairs]
        elif info.get("layers"):
            pairs = list(enumerate(info["layers"]))
        else:
            raise RecipeError(
                f"{field} is needed for hidden_mse: the student was not cut from the teacher, so its layers have no teacher counterpart",
                hint="give hidden_pairs: [[student_layer, teacher_layer], ...]",
            )
        if not pairs:
            raise RecipeError(f"{field} is empty", hint="give at least one [student_layer, teacher_layer] pair or set hidden_mse: 0")
        check_hidden_pairs(pairs, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        return pairs

    def _baseline(self, ctx: RunContext, name: str, init_dir: Path, bdir: Path) -> tuple[str, dict]:
        """The comparison students, same token budget: without KD (same init), KD from a random FFN init, or neither."""
        from dsk_compress.compress import dist
        from dsk_compress.compress.student import build_student
        from dsk_compress.models.source import load_hf_dir, save_hf_dir

        if dist.broadcast_object((bdir / "model" / "config.json").is_file() and (bdir / "metrics.json").is_file()):
            return ctx.rel(bdir / "model"), read_json(bdir / "metrics.json")
        c = self.config
        ft = ctx.spec.student.from_teacher
        binfo: dict = {}
        # a 2x2 of (student init) x (KD or hard labels only) around the main student (init ffn_init, with KD)
        if name == "nokd":
            model = load_hf_dir(init_dir)
        else:
            if ft is None:
                from dsk_compress.errors import RecipeError

                raise RecipeError(f"the {name} baseline needs student.from_teacher")
            model, binfo = build_student(
                ctx.teacher(),
                layers=ft.layers,
                keep_every=ft.keep_every,
                intermediate_size=ft.intermediate_size,
                ffn_init="random",
                seed=ctx.spec.seed,
            )
        cfg = c.model_copy(update={"kd_weight": 0.0, "hidden_mse": 0.0}) if name.endswith("nokd") else c
        init = evaluate(ctx, model)
        pairs = self._hidden_pairs(ctx, model, ctx.teacher(), binfo) if cfg.hidden_mse > 0 else None
        res = kd_train(ctx, model, cfg, "distill", bdir / "checkpoint", hidden_pairs=pairs)
        metrics = {"init": init, "train": train_summary(res), **evaluate(ctx, model)}
        if dist.is_main():
            from dsk_compress.io import atomic_write_json

            save_hf_dir(model, bdir / "model")
            atomic_write_json(bdir / "metrics.json", metrics)
        dist.barrier()
        return ctx.rel(bdir / "model"), metrics
