"""The recipe schema: one declarative YAML for the whole distill -> prune -> qat -> export -> bench chain.

The ``stages`` list is a union of the configs of every registered stage (:data:`dsk_compress.recipes.base.STAGES`),
discriminated by ``stage``; each stage's config lives in its own module under :mod:`dsk_compress.recipes.stages`
(re-exported here). Registering another stage rebuilds :class:`RecipeSpec` with it, and the stage order and the
"stage X needs Y" errors come from what the stages declare they require, consume and provide.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

# importing the stages registers the built-ins; their configs are re-exported for the code that imports them from here
from dsk_compress.recipes.base import STAGES, StageConfig, StrictModel
from dsk_compress.recipes.limits import (
    MAX_CALIBRATION_BATCHES,
    MAX_EVAL_SEQUENCES,
    MAX_SEED,
    MAX_WIDTH,
    check_run_name,
    check_threads_fit,
)
from dsk_compress.recipes.stages.bench import BenchStageConfig
from dsk_compress.recipes.stages.common import _TrainSettings
from dsk_compress.recipes.stages.distill import DistillConfig
from dsk_compress.recipes.stages.export import ExportConfig, TensorRTBuildSpec
from dsk_compress.recipes.stages.prune import PruneConfig, PruneTargetSpec
from dsk_compress.recipes.stages.qat import QATConfig

__all__ = [
    "RECIPE_VERSION",
    "RecipeSpec",
    "StageConfig",
    "DistillConfig",
    "PruneConfig",
    "PruneTargetSpec",
    "QATConfig",
    "ExportConfig",
    "TensorRTBuildSpec",
    "BenchStageConfig",
    "ModelSourceSpec",
    "StudentSpec",
    "FromTeacherSpec",
    "TaskSpec",
    "TextTaskSpec",
    "TorchTaskSpec",
    "LogitCacheSpec",
    "DistributedSpec",
    "ReportSpec",
    "stage_union",
    "_TrainSettings",
]

RECIPE_VERSION = 1
_Strict = StrictModel


class ModelSourceSpec(_Strict):
    """Where a model comes from: exactly one of ``zoo``, ``hf`` or ``torch``."""

    zoo: str | None = Field(None, description="name of a built-in zoo model, e.g. code-lm-moe")
    hf: str | None = Field(None, description="path to a local Hugging Face model directory")
    torch: str | None = Field(None, description="'pkg.module:factory' returning an nn.Module")
    checkpoint: str | None = Field(None, description="safetensors weights for a torch factory (must exist)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="teacher only: the dtype it is loaded and run in (no fp32 copy is made): auto is the checkpoint's dtype "
        "for bf16 / fp32 weights and fp32 for fp16 weights (fp16 matmuls on a CPU are slow and lose accuracy); "
        "zoo and torch models load in fp32 unless set",
    )

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("zoo", "hf", "torch") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of zoo, hf, torch (got {given or 'none'})")
        if self.checkpoint is not None and self.torch is None:
            raise ValueError(f"checkpoint goes with torch: 'pkg.module:factory'; a {given[0]} model's weights are in its own files")
        return self


class FromTeacherSpec(_Strict):
    """A dense student cut from the teacher: its layers, width and FFN initialisation."""

    layers: list[Annotated[int, Field(ge=0, le=MAX_WIDTH)]] | None = Field(
        None, min_length=1, description="teacher layer indices to keep, e.g. [0, 2, 5]; not with keep_every"
    )
    keep_every: int | None = Field(None, ge=1, le=MAX_WIDTH, description="keep every k-th teacher layer (and the last); not with layers")
    intermediate_size: int | None = Field(
        None,
        gt=0,
        le=MAX_WIDTH,
        description="dense FFN width (default: one routed expert's; at most a layer's experts + shared expert side by side)",
    )
    ffn_init: Literal["merge", "top", "random"] = Field(
        "merge",
        description="router-frequency-weighted merge of all experts (+ shared expert), the most-used expert(s) (+ shared), or random",
    )
    calibration_batches: int = Field(8, ge=1, le=MAX_CALIBRATION_BATCHES, description="batches used to measure router frequencies")

    @model_validator(mode="after")
    def _layers_or_keep_every(self):
        if self.layers is not None and self.keep_every is not None:
            raise ValueError("give layers or keep_every, not both (keep_every would be ignored)")
        return self


class StudentSpec(_Strict):
    from_teacher: FromTeacherSpec | None = None
    zoo: str | None = None
    hf: str | None = None
    torch: str | None = Field(None, description="your own model: 'pkg.module:factory' returning an nn.Module with model(x) -> logits")
    checkpoint: str | None = Field(None, description="safetensors weights for the torch factory")

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.from_teacher, self.zoo, self.hf, self.torch)) != 1:
            raise ValueError("give exactly one of from_teacher, zoo, hf, torch")
        if self.checkpoint is not None and self.torch is None:
            raise ValueError("checkpoint goes with torch: 'pkg.module:factory'")
        return self


class TaskSpec(_Strict):
    """The built-in ``code-lm`` task (Python standard-library source, byte level)."""

    name: Literal["code-lm"] = "code-lm"
    seq_len: int = Field(256, ge=8, le=4096)
    eval_sequences: int = Field(128, ge=1, le=MAX_EVAL_SEQUENCES)


class TextTaskSpec(_Strict):
    """``text-lm``: the user's own .txt / .jsonl files, tokenized with a local tokenizer (the teacher's)."""

    name: Literal["text-lm"]
    train: list[str] = Field(min_length=1, description="training files (.txt, .jsonl or .json)")
    eval: list[str] = Field(min_length=1, description="validation files (.txt, .jsonl or .json)")
    tokenizer: str = Field(description="local tokenizer directory, usually the teacher's")
    text_field: str = "text"
    format: Literal["auto", "text", "jsonl", "json"] = Field(
        "auto",
        description="how the files are read: auto (by suffix, any case: .jsonl/.ndjson one JSON record per line, .json a list of "
        "records, anything else plain text, refused when it looks like JSON), text, jsonl or json",
    )
    encoding: str = Field("utf-8", description="text encoding of the files, e.g. latin-1")
    seq_len: int = Field(256, ge=8, le=8192)
    eval_sequences: int = Field(64, ge=1, le=MAX_EVAL_SEQUENCES)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}; e.g. utf-8, latin-1, cp1252") from None
        return v


class TorchTaskSpec(_Strict):
    """Your own task: ``torch: "pkg.module:make_task"`` returns an object implementing the Task protocol (data + metric)."""

    name: Literal["torch"] = "torch"
    torch: str = Field(description="'pkg.module:make_task'; the current directory is added to sys.path if the module is not found")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the task factory")


AnyTask = Annotated[Union[TaskSpec, TextTaskSpec, TorchTaskSpec], Field(discriminator="name")]


def stage_union() -> Any:
    """The type of one ``stages`` item: the registered stages' configs, discriminated by ``stage``."""
    configs = tuple(cls.config_type for cls in STAGES.classes())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="stage")]


AnyStage = stage_union()
STAGE_ORDER = STAGES.order()  # the built-ins' order, derived from their declarations (distill -> ... -> bench)


class LogitCacheSpec(_Strict):
    """Cache the teacher's top-k logits on disk and reuse them in every KD stage (which then share the data stream)."""

    enabled: bool = False
    top_k: int = Field(32, ge=1, le=4096, description="teacher logits kept per position (fp16 values + int indices)")


class DistributedSpec(_Strict):
    """How a run under ``torchrun`` (more than one process) holds the teacher; ignored in a single process."""

    teacher: Literal["replicate", "fsdp"] = Field(
        "replicate",
        description="replicate: every rank holds the whole teacher on its device; fsdp: the teacher's weights are sharded across "
        "the ranks' devices (FSDP2, one unit per decoder layer, gathered just in time for each forward), for a teacher "
        "that does not fit one device",
    )


class ReportSpec(_Strict):
    max_accuracy_drop: float = Field(3.0, ge=0, description="accuracy points a shippable variant may lose")


class RecipeSpec(_Strict):
    """A whole compression recipe."""

    version: int = Field(RECIPE_VERSION, ge=1, description="recipe format version (1)")
    name: str = Field(description="run folders are named <name>-<time>: letters, digits, '.', '_', '-', '+', at most 100 characters")
    description: str = Field("", max_length=10_000)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="torch and data seed, 0..2**32-1")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads for training and evaluation (default: OMP_NUM_THREADS if "
        "set, else this machine's physical cores; --threads overrides it); at most 4x this machine's CPUs; "
        "bench stages keep their own threads",
    )
    teacher: ModelSourceSpec
    student: StudentSpec
    task: AnyTask = TaskSpec()
    stages: list[AnyStage] = Field(min_length=1)
    logit_cache: LogitCacheSpec = LogitCacheSpec()
    distributed: DistributedSpec = DistributedSpec()
    report: ReportSpec = ReportSpec()
    keep_checkpoints: bool = Field(
        False,
        description="keep each training stage's last checkpoint (model copy + AdamW state, about "
        "4x the student's fp32 weights) after the stage is done; by default it is deleted then",
    )
    # (recipe name or path, --set values) as load_recipe read it: resume and rebuild hints repeat them
    _origin: tuple[str, tuple[str, ...]] | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_run_name(v)

    @field_validator("threads")
    @classmethod
    def _threads_fit(cls, v: int | None) -> int | None:
        return check_threads_fit(v)

    @field_validator("task", mode="before")
    @classmethod
    def _torch_task_tag(cls, v):
        # `task: {torch: "pkg.mod:make_task"}` needs no `name`
        if isinstance(v, dict) and "torch" in v and "name" not in v:
            return {"name": "torch", **v}
        return v

    @model_validator(mode="after")
    def _torch_models(self):
        """Your own torch student: its task, teacher and stages must fit it; every factory must import and be callable."""
        from dsk_compress.plugins import load_target

        torch_task = isinstance(self.task, TorchTaskSpec)
        if self.student.torch is not None:
            if not torch_task:
                raise ValueError("student.torch needs your own task too: task: {torch: 'pkg.module:make_task'}")
            if self.teacher.torch is None:
                raise ValueError(
                    "student.torch distils from a teacher of the same kind: teacher: {torch: 'pkg.module:factory', checkpoint: ...} "
                    "(e.g. the unpruned model)"
                )
            for i, st in enumerate(self.stages):
                if st.stage == "distill":
                    raise ValueError(
                        f"stages.{i}: distill cuts a student from a Hugging Face MoE teacher; a torch student starts at prune, qat or export"
                    )
                if st.stage == "prune":
                    bad = [k for k in ("ffn_ratio", "head_ratio", "layers_removed", "depth_ratio", "target") if getattr(st, k)]
                    if bad:
                        raise ValueError(f"stages.{i}.{bad[0]} applies to Hugging Face students; for a torch student set channel_ratio")
                    if st.importance == "activation":
                        raise ValueError(f"stages.{i}.importance: activation is not supported for torch students; use l1, l2 or taylor")
                if st.stage == "qat" and "int4" in st.precisions:
                    raise ValueError(
                        f"stages.{i}.precisions: int4 QAT (MatMulNBits) applies to Hugging Face decoders; a torch student trains int8"
                    )
        else:
            if torch_task:
                raise ValueError("task.torch needs your own model: student: {torch: 'pkg.module:factory', checkpoint: ...}")
            for i, st in enumerate(self.stages):
                if st.stage == "prune" and st.channel_ratio is not None:
                    raise ValueError(
                        f"stages.{i}.channel_ratio applies to torch students; use ffn_ratio / head_ratio for Hugging Face models"
                    )
        for field, target in (
            ("task.torch", getattr(self.task, "torch", None)),
            ("student.torch", self.student.torch),
            ("teacher.torch", self.teacher.torch),
        ):
            if target is not None:
                load_target(target, field, ValueError)
        return self

    @model_validator(mode="after")
    def _stage_order(self):
        if self.version > RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is newer than this dsk-compress supports ({RECIPE_VERSION})")
        problem = STAGES.order_problem([st.stage for st in self.stages])
        if problem:
            raise ValueError(problem)
        return self


def _rebuild_recipe_spec() -> None:
    """Give :class:`RecipeSpec` the union of the stages registered now (the registry calls this on every change)."""
    from pydantic.fields import FieldInfo

    global AnyStage
    AnyStage = stage_union()
    RecipeSpec.model_fields["stages"] = FieldInfo.merge_field_infos(RecipeSpec.model_fields["stages"], annotation=list[AnyStage])
    RecipeSpec.model_rebuild(force=True)


STAGES.subscribe(_rebuild_recipe_spec)
