"""The recipe schema: one declarative YAML for the whole distill -> prune -> qat -> export -> bench chain."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from dsk_compress.recipes.limits import (
    MAX_BATCH,
    MAX_CALIBRATION_BATCHES,
    MAX_EVAL_SEQUENCES,
    MAX_RUNS,
    MAX_SEED,
    MAX_STEPS,
    MAX_WIDTH,
    check_device_name,
    check_run_name,
    check_threads_fit,
)

RECIPE_VERSION = 1


class _Strict(BaseModel):
    # NaN and infinities are refused in every float field (a NaN bound turns a check off, an inf temperature NaNs the loss)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSourceSpec(_Strict):
    """Where a model comes from: exactly one of ``zoo``, ``hf`` or ``torch``."""

    zoo: str | None = Field(None, description="name of a built-in zoo model, e.g. code-lm-moe")
    hf: str | None = Field(None, description="path to a local Hugging Face model directory")
    torch: str | None = Field(None, description="'pkg.module:factory' returning an nn.Module")
    checkpoint: str | None = Field(None, description="safetensors weights for a torch factory (must exist)")

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
        None, min_length=1, description="teacher layer indices to keep, e.g. [0, 2, 5]; not with keep_every")
    keep_every: int | None = Field(None, ge=1, le=MAX_WIDTH, description="keep every k-th teacher layer (and the last); not with layers")
    intermediate_size: int | None = Field(
        None, gt=0, le=MAX_WIDTH, description="dense FFN width (default: one routed expert's; at most a layer's experts + shared expert side by side)"
    )
    ffn_init: Literal["merge", "top", "random"] = Field(
        "merge", description="router-frequency-weighted merge of all experts (+ shared expert), the most-used expert(s) (+ shared), or random"
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
        "auto", description="how the files are read: auto (by suffix, any case: .jsonl/.ndjson one JSON record per line, .json a list of "
                            "records, anything else plain text, refused when it looks like JSON), text, jsonl or json")
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


class StageConfig(_Strict):
    """Base of every stage config; ``stage`` is the discriminator."""

    stage: str


class _TrainSettings(_Strict):
    steps: int = Field(200, ge=0, le=MAX_STEPS, description="optimizer steps")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="sequences per step (the memory it needs is checked before the run)")
    lr: float = Field(1e-3, gt=0, le=1)
    warmup: int = Field(20, ge=0, le=MAX_STEPS)
    temperature: float = Field(2.0, gt=0, le=100, description="KD softmax temperature")
    kd_weight: float = Field(0.8, ge=0, le=1, description="weight of the KD term; the rest is hard-label CE")
    reverse_kl: float = Field(0.0, ge=0, le=100, description="weight of the reverse KL(student || teacher) inside the KD term (online teacher only)")
    eval_every: int = Field(0, ge=0, le=MAX_STEPS, description="validate every N steps (0: only at the end)")
    early_stop_patience: int = Field(0, ge=0, le=MAX_STEPS, description="stop after N validations without improvement (needs eval_every)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training precision: auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 autocast, fp16 autocast + gradient scaler (CUDA only)"
    )


class DistillConfig(StageConfig, _TrainSettings):
    stage: Literal["distill"] = "distill"
    hidden_mse: float = Field(0.0, ge=0, le=1e6, description="weight of the hidden-state MSE (projected student layer vs teacher layer; online teacher only)")
    hidden_pairs: list[tuple[int, int]] | None = Field(
        None, description="[[student_layer, teacher_layer], ...] for hidden_mse (default: each student layer and the teacher layer it was cut from)"
    )
    baselines: list[Literal["nokd", "random-init", "random-init-nokd"]] = Field(
        default_factory=list,
        description="also train, on the same token budget: the same student without KD (nokd), a KD student with random FFN init "
                    "(random-init), and a random-FFN student without KD (random-init-nokd)",
    )


class PruneTargetSpec(_Strict):
    """Prune to a budget instead of fixed ratios: exactly one of ``params``, ``macs`` or ``latency_ms``."""

    params: float | None = Field(None, gt=0, lt=1, description="keep at most this fraction of the parameters, e.g. 0.5")
    macs: float | None = Field(None, gt=0, lt=1, description="keep at most this fraction of the MACs of one forward pass (batch 1, the task's seq_len)")
    latency_ms: float | None = Field(None, gt=0, description="p50 latency budget in ms: ONNX Runtime on this host, batch 1, the task's seq_len")
    device: str = Field("host-cpu", description="where latency_ms is measured; only host-cpu (this machine) can be measured during pruning")
    structures: list[Literal["ffn", "heads", "layers"]] = Field(
        default_factory=lambda: ["ffn"], min_length=1, description="what the target prunes, all by one common ratio (heads go in whole KV groups)"
    )
    max_ratio: float = Field(0.9, gt=0, lt=1, description="largest fraction of each structure the target may remove")
    step: float = Field(0.1, gt=0, lt=1, description="latency_ms: ratio added per progressive step (export + measure + fine-tune)")
    runs: int = Field(20, ge=1, le=MAX_RUNS, description="latency_ms: timed runs per measurement")
    warmup: int = Field(3, ge=0, le=MAX_RUNS, description="latency_ms: untimed runs per measurement")

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in ("params", "macs", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"target: give exactly one of params, macs, latency_ms (got {', '.join(given) or 'none'})")
        if self.device != "host-cpu":
            raise ValueError(f"target.device {self.device!r}: latency is measured on this host while pruning; use device: host-cpu "
                             "(measure a device with `dsk-compress export RUN --device D` and its run.py)")
        if len(set(self.structures)) != len(self.structures):
            raise ValueError(f"target.structures {self.structures} names a structure twice")
        return self


class PruneConfig(StageConfig, _TrainSettings):
    stage: Literal["prune"] = "prune"
    ffn_ratio: float | None = Field(
        None, ge=0, lt=1, description="fraction of FFN channels removed (default 0.5 when nothing else is pruned; 0 when head_ratio, "
                                      "layers_removed, depth_ratio, expert_ratio or target is given)"
    )
    head_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed, in whole KV groups with their query heads")
    channel_ratio: float | None = Field(
        None, ge=0, lt=1, description="torch (non-Hugging Face) student: fraction of each conv's output channels removed (default 0.5)"
    )
    layers_removed: int = Field(0, ge=0, le=MAX_WIDTH, description="decoder layers removed, lowest block influence (1 - cos(input, output) on calibration data) first")
    depth_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of decoder layers removed (rounded down); alternative to layers_removed")
    expert_ratio: float = Field(
        0.0, ge=0, lt=1, description="MoE students: fraction of routed experts removed from every MoE layer, least used on calibration data first"
    )
    importance: Literal["l1", "l2", "taylor", "activation"] = Field(
        "l2", description="channel/head importance: weight magnitude (l1, l2), first-order Taylor, or mean |activation| on calibration data"
    )
    calibration_batches: int = Field(8, ge=1, le=MAX_CALIBRATION_BATCHES, description="batches of 8 training windows for activation importance, layer block influence and expert router frequencies")
    target: PruneTargetSpec | None = Field(None, description="prune to a budget instead of ratios: {params: F}, {macs: F} or {latency_ms: X, device: host-cpu}")
    iterations: int = Field(1, ge=1, le=1000, description="progressive pruning: prune a slice, fine-tune, repeat")
    round_to: int = Field(8, ge=1, le=4096, description="channel counts rounded to a multiple of this")
    steps: int = Field(100, ge=0, le=MAX_STEPS, description="KD fine-tune steps after each pruning step")
    timeout_s: float = Field(300, gt=0, le=7 * 86400, description="abort pruning a model that takes longer (torch-pruning GQA hang)")
    baselines: list[Literal["oneshot"]] = Field(
        default_factory=list, description="also prune one-shot to the same size with the same total fine-tune budget (role pruned-oneshot)"
    )

    @model_validator(mode="after")
    def _ratios_or_target(self):
        if self.layers_removed and self.depth_ratio:
            raise ValueError("give layers_removed or depth_ratio, not both")
        if self.expert_ratio:
            given = [k for k in ("ffn_ratio", "head_ratio", "layers_removed", "depth_ratio", "target") if getattr(self, k)]
            if given:
                raise ValueError(f"expert_ratio prunes the experts of an MoE student and cannot be combined with {', '.join(given)}; "
                                 "prune experts here and distill to a dense student for the rest")
        if self.target is not None:
            given = [k for k in ("ffn_ratio", "head_ratio", "layers_removed", "depth_ratio") if getattr(self, k)]
            if given:
                raise ValueError(f"give either target or ratios, not both (got target and {', '.join(given)}); "
                                 f"remove target or set {given[0]}: 0")
            if self.target.latency_ms is not None and self.iterations != 1:
                raise ValueError("target.latency_ms prunes in steps of target.step until the budget is met; remove iterations")
        return self

    @property
    def effective_ffn_ratio(self) -> float:
        """``ffn_ratio``, or its default: 0.5 when nothing else is pruned, 0 next to head, depth or expert pruning or a target."""
        if self.ffn_ratio is not None:
            return self.ffn_ratio
        return 0.0 if (self.target is not None or self.head_ratio or self.layers_removed or self.depth_ratio or self.expert_ratio) else 0.5


class QATConfig(StageConfig, _TrainSettings):
    stage: Literal["qat"] = "qat"
    weight_bits: int = Field(8, ge=4, le=8)
    activation_bits: Literal[8] = 8
    avx2_safe: bool = Field(True, description="use 7-bit weight range so ORT's u8s8 kernels never saturate without VNNI")
    activations: Literal["asymmetric", "symmetric"] = Field(
        "symmetric",
        description="activation quantizers: symmetric (int8, zero point 0: runs in ONNX Runtime and TensorRT, so one QAT model "
                    "serves every device) or asymmetric (uint8 + zero point, ONNX Runtime only; the default for your own torch "
                    "model when unset, as ONNX Runtime's x86 QLinearConv needs it)",
    )
    observer_steps: int = Field(20, ge=1, le=MAX_CALIBRATION_BATCHES, description="steps of min/max observation before scales are learned")
    share_input_quantizers: bool = Field(
        True, description="one activation quantizer per input tensor: layers that read the same tensor (q/k/v, gate/up) share one "
                          "learned scale, so the int8 graph packs them into one integer MatMul (TensorRT also wants one scale per tensor)")
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module names kept in float")
    lr: float = Field(2e-4, gt=0, le=1)


class TensorRTBuildSpec(_Strict):
    """TensorRT engine settings for an export whose device prefers the tensorrt runtime."""

    build_engine: bool = Field(True, description="build the engine at export when tensorrt and a CUDA GPU are there (else run.py builds it on the device)")
    workspace_gb: float = Field(2.0, gt=0, le=1024, description="builder workspace memory pool limit in GiB")
    max_batch: int = Field(8, ge=1, le=MAX_BATCH, description="largest batch of the engine's optimization profile")
    opt_batch: int = Field(1, ge=1, le=MAX_BATCH, description="batch size the builder tunes kernels for")
    max_seq_len: int | None = Field(None, ge=1, le=1_000_000, description="longest sequence of the profile (default: the task's seq_len)")

    @model_validator(mode="after")
    def _batches(self):
        if self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch ({self.opt_batch}) must be <= max_batch ({self.max_batch})")
        return self


class ExportConfig(StageConfig):
    stage: Literal["export"] = "export"
    opset: int = Field(17, ge=13, le=21)
    optimization: Literal["basic", "extended"] = "extended"
    parity_atol: float = Field(1e-3, gt=0, le=1e3, description="max |torch - onnx| for float exports")
    qdq_min_sqnr_db: float = Field(30.0, ge=0, le=200, description="min SQNR of the INT8 ONNX vs the torch fake-quant model")
    ptq_baselines: bool = Field(True, description="also export ORT dynamic and static PTQ of the float student (report baselines)")
    ptq_calibration_batches: int = Field(16, ge=1, le=MAX_CALIBRATION_BATCHES, description="batches of 4 training windows for static PTQ calibration")
    precisions: list[Literal["fp32", "fp16", "int8", "int4"]] = Field(
        default_factory=lambda: ["fp32", "int8"],
        description="what to write: fp32 (every student stage, always), fp16 (the last float student), int8 (the QAT student) "
                    "and int4 (weight-only MatMulNBits of the last float student, for ARM boards)",
    )
    fp16_max_rel_err: float = Field(0.01, gt=0, le=1e3, description="max |onnx fp16 - torch fp32| of the logits, relative to max |torch logits|")
    kv_cache: bool = Field(
        True, description="also write a KV-cache graph (<name>.kv.onnx: past_key_values in, present out) of each fp32 student and the "
                          "int8 QAT student, for token-by-token generation; bench measures its decode tokens/s"
    )
    device: str | None = Field(
        None, description="target device profile: its preferred precision is exported too; a tensorrt device gets a TensorRT-checked graph (and an engine where tensorrt runs)"
    )
    tensorrt: TensorRTBuildSpec = Field(default_factory=lambda: TensorRTBuildSpec(), description="TensorRT engine build settings")

    @field_validator("precisions")
    @classmethod
    def _fp32_always(cls, v: list[str]) -> list[str]:
        if "fp32" not in v:
            raise ValueError("must include fp32 (the float student exports are the report's reference rows), e.g. [fp32, fp16, int8]")
        return list(dict.fromkeys(v))

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str | None) -> str | None:
        return check_device_name(v) if v is not None else v


class BenchStageConfig(StageConfig):
    stage: Literal["bench"] = "bench"
    device: str = Field("host-cpu", description="device profile whose threads and execution providers apply on this host (see "
                        "`dsk-compress devices`); rows are labelled with this host, and a profile of another CPU architecture is "
                        "refused: measure a board with `dsk-compress bench RUN --device D --host H`")
    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="the latency batch (p50/p90/p99 in the report)")
    throughput_batches: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = Field(default_factory=lambda: [8, 64], max_length=8,
                                          description="further batch sizes timed for throughput (items/s) where the model allows; "
                                                      "each stops after 10 s once it has 3 runs")
    warmup: int = Field(5, ge=0, le=MAX_RUNS)
    runs: int = Field(30, ge=1, le=MAX_RUNS)
    threads: int | None = Field(None, ge=1, description="ONNX Runtime threads (default: the device's); at most 4x this machine's CPUs")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        return check_device_name(v)

    @field_validator("threads")
    @classmethod
    def _threads_fit(cls, v: int | None) -> int | None:
        return check_threads_fit(v)


AnyStage = Annotated[
    Union[DistillConfig, PruneConfig, QATConfig, ExportConfig, BenchStageConfig],
    Field(discriminator="stage"),
]

STAGE_ORDER = ["distill", "prune", "qat", "export", "bench"]


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
    threads: int | None = Field(None, ge=1, description="torch CPU threads for training and evaluation (default: OMP_NUM_THREADS if "
                                "set, else this machine's physical cores; --threads overrides it); at most 4x this machine's CPUs; "
                                "bench stages keep their own threads")
    teacher: ModelSourceSpec
    student: StudentSpec
    task: AnyTask = TaskSpec()
    stages: list[AnyStage] = Field(min_length=1)
    logit_cache: LogitCacheSpec = LogitCacheSpec()
    distributed: DistributedSpec = DistributedSpec()
    report: ReportSpec = ReportSpec()
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
                raise ValueError("student.torch distils from a teacher of the same kind: teacher: {torch: 'pkg.module:factory', checkpoint: ...} "
                                 "(e.g. the unpruned model)")
            for i, st in enumerate(self.stages):
                if st.stage == "distill":
                    raise ValueError(f"stages.{i}: distill cuts a student from a Hugging Face MoE teacher; a torch student starts at prune, qat or export")
                if st.stage == "prune":
                    bad = [k for k in ("ffn_ratio", "head_ratio", "layers_removed", "depth_ratio", "target") if getattr(st, k)]
                    if bad:
                        raise ValueError(f"stages.{i}.{bad[0]} applies to Hugging Face students; for a torch student set channel_ratio")
                    if st.importance == "activation":
                        raise ValueError(f"stages.{i}.importance: activation is not supported for torch students; use l1, l2 or taylor")
        else:
            if torch_task:
                raise ValueError("task.torch needs your own model: student: {torch: 'pkg.module:factory', checkpoint: ...}")
            for i, st in enumerate(self.stages):
                if st.stage == "prune" and st.channel_ratio is not None:
                    raise ValueError(f"stages.{i}.channel_ratio applies to torch students; use ffn_ratio / head_ratio for Hugging Face models")
        for field, target in (("task.torch", getattr(self.task, "torch", None)), ("student.torch", self.student.torch),
                              ("teacher.torch", self.teacher.torch)):
            if target is not None:
                load_target(target, field, ValueError)
        return self

    @model_validator(mode="after")
    def _stage_order(self):
        if self.version > RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is newer than this dsk-compress supports ({RECIPE_VERSION})")
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            if st.stage in seen and st.stage in ("distill", "qat", "export", "bench"):
                raise ValueError(f"stages.{i}: a second {st.stage!r} stage is not supported")
            for later in seen:
                if STAGE_ORDER.index(later) > STAGE_ORDER.index(st.stage):
                    raise ValueError(
                        f"stages.{i}: {st.stage!r} cannot come after {later!r}; order stages as {' -> '.join(STAGE_ORDER)}"
                    )
            seen.append(st.stage)
        if "bench" in seen and "export" not in seen:
            raise ValueError("a 'bench' stage needs an 'export' stage before it")
        if self.student.from_teacher is None and "distill" in seen and self.teacher is None:
            raise ValueError("distill needs a teacher")
        return self
