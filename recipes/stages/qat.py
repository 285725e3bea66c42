"""The qat stage: quantization-aware training of the student, one QAT student per entry of ``precisions``.

Story: refuse asymmetric activations when a later export targets TensorRT in int8 (before any training);
load the student the earlier stages left and measure it; then for each precision, from that same student:

* ``int8``: swap every Linear (and, for your own torch model, every Conv2d after folding BatchNorm into it) for a
  fake-quant layer (``compress/qat.py``); observe activation ranges on calibration batches and measure again (what
  plain PTQ would give); KD fine-tune with learned activation scales (one quantizer per input tensor: layers reading
  the same tensor share it unless ``share_input_quantizers: false``); save ``qat/model`` with ``qat.json`` (bits,
  activations, quantized layers, shared groups). Output ``qat_model``.
* ``int4``: swap every Linear for the MatMulNBits scheme (4-bit weights per block of ``int4.block_size`` inputs with
  MSE-initialised scales, the LM head at ``int4.head_bits``, int8 activations per block at run time, the embedding
  int8 per row); measure (post-training, the scales' initial values); KD fine-tune weights and LSQ scales with the
  same settings and data (``int4.steps`` of them when set); save ``qat/int4/model``. Output ``qat_int4_model``.

Metrics: the int8 student's at the top level (as a single-precision stage always wrote them), the int4 student's
under ``int4``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dsk_compress.recipes.base import STAGES, RunContext, Stage, StageConfig, StageResult, StrictModel
from dsk_compress.recipes.limits import MAX_CALIBRATION_BATCHES, MAX_STEPS
from dsk_compress.recipes.stages.common import (  # your own torch model
    _TrainSettings,
    evaluate,
    is_torch_run,
    kd_train,
    rank0,
    stage_field,
    student_model,
    torch_evaluate,
    torch_kd_train,
    torch_student,
    torch_train_summary,
    train_summary,
)


class Int4QATSettings(StrictModel):
    """How the ``int4`` precision quantizes (ONNX Runtime's MatMulNBits with accuracy_level 4)."""

    block_size: Literal[16, 32, 64, 128] = Field(32, description="input features per weight scale and per activation scale")
    scale_init: Literal["mse", "absmax"] = Field(
        "mse", description="initial block scales: least squared error, or absmax / 7; then learned (LSQ)"
    )
    head_bits: Literal[4, 8] | None = Field(8, description="the LM head's weight bits (MatMulNBits, same blocks); null keeps it float")
    embedding_bits: Literal[8] | None = Field(
        8, description="the token embedding: int8 per row (one GatherBlockQuantized); null keeps it float"
    )
    steps: int | None = Field(
        None,
        ge=0,
        le=MAX_STEPS,
        description="optimizer steps of the int4 student (default: the stage's steps); its step costs about what an int8 one does",
    )


class QATConfig(StageConfig, _TrainSettings):
    stage: Literal["qat"] = "qat"
    precisions: list[Literal["int8", "int4"]] = Field(
        default_factory=lambda: ["int8"],
        min_length=1,
        description="one QAT student per entry, each trained from the same float student with the same steps and data: int8 (per-channel "
        "weights, static per-tensor activations; Q/DQ graphs, TensorRT) and int4 (MatMulNBits: 4-bit block weights with "
        "learned scales, int8 activations per block at run time; ONNX Runtime)",
    )
    int4: Int4QATSettings = Field(default_factory=lambda: Int4QATSettings(), description="the int4 precision's quantization")
    weight_bits: int = Field(8, ge=4, le=8, description="int8 precision: weight bits (7-bit range with avx2_safe)")
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
        True,
        description="one activation quantizer per input tensor: layers that read the same tensor (q/k/v, gate/up) share one "
        "learned scale, so the int8 graph packs them into one integer MatMul (TensorRT also wants one scale per tensor)",
    )
    embedding_bits: Literal[8] | None = Field(
        8,
        description="int8 precision: the token embedding int8 per row (ONNX Runtime graphs store the int8 table and one scale "
        "per row; the TensorRT Q/DQ graph keeps the dequantized table); null keeps it float",
    )
    skip: list[str] = Field(
        default_factory=list,
        description="module names kept in float, e.g. [lm_head] (int8: the LM head is quantized like every Linear unless named "
        "here; int4: it follows int4.head_bits)",
    )
    lr: float = Field(2e-4, gt=0, le=1)

    @field_validator("precisions")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


@STAGES.register("qat")
class QATStage(Stage[QATConfig]):
    """Quantization-aware KD fine-tune of the student, one per precision (int8: learned activation scales; int4: MatMulNBits
    blocks with learned scales)."""

    consumes = ("model",)  # the latest float student (else the recipe's own)
    provides = ("qat_model", "qat_int4_model")

    def effective_config(self, spec) -> QATConfig:
        """Your own torch model's activations default to :data:`CONV_ACTIVATIONS` when the recipe leaves them unset."""
        c = self.config
        if getattr(spec.student, "torch", None) is not None and "activations" not in c.model_fields_set:
            return c.model_copy(update={"activations": CONV_ACTIVATIONS})  # ONNX Runtime's x86 QLinearConv needs uint8
        return c

    def budget(self, spec) -> str:
        """What the stage header says it will train: each precision's steps (int4's own ``int4.steps`` when set)."""
        c = self.effective_config(spec)
        parts = [f"{p} {c.int4.steps if p == 'int4' and c.int4.steps is not None else c.steps} steps" for p in c.precisions]
        return f"{' + '.join(parts)} x batch {c.batch_size}"

    def run(self, ctx: RunContext) -> StageResult:
        if is_torch_run(ctx):  # your own torch model: BatchNorm folded, Conv2d + Linear fake quant (below)
            return run_torch(self, ctx)
        c = self.config
        trt = _tensorrt_int8_exports(ctx.spec)
        if trt and "int8" in c.precisions and c.activations != "symmetric":  # fail before training, not at export
            from dsk_compress.errors import RecipeError

            qi = next(i for i, st in enumerate(ctx.spec.stages) if st.stage == "qat")
            raise RecipeError(
                f"stages.{trt[0][0]}.device {trt[0][1]!r} runs int8 in TensorRT, which needs symmetric int8 activations, "
                f"but stages.{qi}.activations is {c.activations!r}",
                hint=f"set stages.{qi}.activations: symmetric",
            )
        d = ctx.stage_dir("qat")
        model = student_model(ctx, "qat")
        metrics: dict = {"float": evaluate(ctx, model)}
        outputs: dict = {}
        for k, precision in enumerate(c.precisions):
            if k:  # each from the same float student, read again: one model in memory at a time
                model = student_model(ctx, "qat")
            if precision == "int8":
                path, m = _train_int8(ctx, c, model, d)
                outputs["qat_model"] = ctx.rel(path)
                metrics.update(m)
            else:
                path, metrics["int4"] = _train_int4(ctx, c, model, d / "int4")
                outputs["qat_int4_model"] = ctx.rel(path)
        return StageResult(outputs=outputs, metrics=metrics)


def _train_int8(ctx: RunContext, c: QATConfig, model, d):
    """INT8 QAT of ``model`` (in place): fake quant, calibration, KD fine-tune; saved to ``d / "model"``. Returns that folder
    and the metrics."""
    from dsk_compress.compress.qat import calibrate, prepare_qat, save_qat_model

    names = prepare_qat(model, c.weight_bits, c.avx2_safe, c.skip, activations=c.activations, embedding_bits=c.embedding_bits)
    calibrate(model, ctx.task.calibration_batches(c.observer_steps, c.batch_size), share_inputs=c.share_input_quantizers)
    ptq_metrics = evaluate(ctx, model)
    res = kd_train(ctx, model, c, "qat", d / "checkpoint")
    rank0(save_qat_model, model, d / "model", _qat_info(c, model, names))
    return d / "model", {
        "after_calibration": ptq_metrics,
        "quantized_layers": len(names),
        "train": train_summary(res),
        **evaluate(ctx, model),
    }


def _train_int4(ctx: RunContext, c: QATConfig, model, d):
    """int4 QAT of ``model`` (in place): MatMulNBits fake quant with initial scales, KD fine-tune of weights and scales;
    saved to ``d / "model"``. Returns that folder and the metrics (``after_calibration``: before training, i.e. post-training
    int4 with the initial scales)."""
    from dsk_compress.compress.qat import int4_qat_info, prepare_int4_qat, save_qat_model

    s = c.int4
    names = prepare_int4_qat(model, s.block_size, s.scale_init, s.head_bits, s.embedding_bits, c.skip)
    ptq_metrics = evaluate(ctx, model)
    d.mkdir(parents=True, exist_ok=True)
    res = kd_train(ctx, model, c, "qat", d / "checkpoint", steps=s.steps)
    rank0(save_qat_model, model, d / "model", int4_qat_info(s.block_size, s.scale_init, s.head_bits, s.embedding_bits, c.skip, names))
    return d / "model", {
        "after_calibration": ptq_metrics,
        "quantized_layers": len(names),
        "train": train_summary(res),
        **evaluate(ctx, model),
    }


def _qat_info(c: QATConfig, model, names: list[str]) -> dict:
    """What ``qat.json`` records of a QAT model: its quantization settings, quantized layers and shared quantizers."""
    from dsk_compress.compress.qat import QuantEmbedding, qat_info

    emb = 8 if any(isinstance(m, QuantEmbedding) for m in model.modules()) else None
    return qat_info(model, c.weight_bits, c.avx2_safe, c.activations, c.skip, names, embedding_bits=emb)


def _tensorrt_int8_exports(spec) -> list[tuple[int, str]]:
    """``(stage index, device)`` of export stages whose device runs int8 in TensorRT."""
    from dsk_compress.devices import load_device

    out = []
    for i, st in enumerate(spec.stages):
        if st.stage == "export" and st.device:
            prof = load_device(st.device)
            if prof.preferred_runtime == "tensorrt" and prof.preferred_precision == "int8":
                out.append((i, prof.name))
    return out


# ---------------------------------------------------------------------------------------------
# your own torch model: BatchNorm folded into the convs, then every Conv2d and Linear fake-quantized

CONV_ACTIVATIONS = "asymmetric"
"""Activations of your own torch model's QAT when the recipe does not set them: asymmetric, which ONNX Runtime's
x86 QLinearConv fuses (a causal LM's default, symmetric, suits TensorRT and ORT's integer MatMuls alike)."""


def run_torch(stage: QATStage, ctx: RunContext) -> StageResult:
    """Fold BatchNorm into the convs, fake-quantize every Conv2d and Linear, observe, then KD fine-tune with learned scales."""
    import torch

    from dsk_compress.compress.cnn import fold_batchnorm, forward
    from dsk_compress.compress.qat import calibrate, prepare_qat
    from dsk_compress.models.source import save_model_dir

    c = stage.effective_config(ctx.spec)  # asymmetric unless set (symmetric: 1 of the digits CNN's 4 layers integer)
    if c.precisions != ["int8"]:  # the recipe schema refuses it first; a config built by hand gets the same words
        from dsk_compress.errors import RecipeError

        raise RecipeError(
            f"{stage_field(ctx, 'qat', 'precisions')}: your own torch model trains int8 QAT only", hint="set precisions: [int8]"
        )
    d = ctx.stage_dir("qat")
    model = torch_student(ctx, "qat")
    float_metrics = torch_evaluate(ctx, model)
    pairs = fold_batchnorm(model, torch.as_tensor(ctx.task.example_inputs(8)))
    names = prepare_qat(model, c.weight_bits, c.avx2_safe, c.skip, activations=c.activations)
    calibrate(model, ctx.task.calibration_batches(c.observer_steps, c.batch_size), forward=forward, share_inputs=c.share_input_quantizers)
    ptq_metrics = torch_evaluate(ctx, model)
    res = torch_kd_train(ctx, model, c, "qat", d / "checkpoint")
    save_model_dir(model, d / "model", extra={"bn_folded": [list(p) for p in pairs], "qat": _qat_info(c, model, names)})
    metrics = {
        "float": float_metrics,
        "bn_folded": [b for _, b in pairs],
        "after_calibration": ptq_metrics,
        "quantized_layers": len(names),
        "train": torch_train_summary(res),
        **torch_evaluate(ctx, model),
    }
    return StageResult(outputs={"qat_model": ctx.rel(d / "model")}, metrics=metrics)
