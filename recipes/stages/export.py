"""The export stage: every model the run produced, as ONNX files checked against torch (and TensorRT where asked).

Story: decide the precisions (the recipe's, plus the target device's preferred one) and refuse combinations
that cannot work before exporting anything; export the teacher as export.teacher says (ONNX with dense MoE routing,
a failed export being a one-line error; or PyTorch eager; or skip) and the distill / prune baselines in fp32; each float student in fp32 (+ its KV-cache decode
graph and its fused decoder graph), the last one also in fp16 when asked, and the float student QAT started from as
ORT dynamic / static PTQ baselines; the QAT student as INT8 Q/DQ (+ its KV-cache and fused int8 decoder graphs); the
int4 QAT student (``final-int4``) as MatMulNBits graphs with its trained scales (full-sequence, KV-cache, fused), next to
the post-training int4 of the last float student (``student-int4``); for a TensorRT device, the
TensorRT check and engine build of the artifact it will run. Each artifact's entry (path, role, params,
parity numbers, notes) goes into ``outputs["artifacts"]`` for the bench stage. How each file is made and
checked lives in ``export/`` (``onnx.py``, ``kv_cache.py``, ``fused.py``, ``ptq.py``, ``int8.py``, ``int4.py``, ``tensorrt.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from dsk_compress.artifacts import artifacts_json, read_artifacts
from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files
from dsk_compress.io import read_json
from dsk_compress.progress import step, step_progress
from dsk_compress.recipes.base import STAGES, RunContext, Stage, StageConfig, StageResult, StrictModel
from dsk_compress.recipes.limits import MAX_BATCH, MAX_CALIBRATION_BATCHES, check_device_name
from dsk_compress.recipes.stages.common import is_torch_run, torch_student

# (stage, baseline) -> (artifact role, note) of the comparison students earlier stages leave
BASELINE_ROLES = {
    ("distill", "nokd"): ("student-nokd", "same init and token budget, trained without KD (hard labels only)"),
    ("distill", "random-init"): ("student-random-init", "KD with a randomly initialised FFN, same token budget"),
    ("distill", "random-init-nokd"): (
        "student-random-init-nokd",
        "randomly initialised FFN, same token budget, trained without KD (hard labels only)",
    ),
    ("prune", "oneshot"): ("pruned-oneshot", "pruned to the same size in one step, same total fine-tune budget"),
}


class TensorRTBuildSpec(StrictModel):
    """TensorRT engine settings for an export whose device prefers the tensorrt runtime."""

    build_engine: bool = Field(
        True, description="build the engine at export when tensorrt and a CUDA GPU are there (else run.py builds it on the device)"
    )
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
    teacher: Literal["auto", "onnx", "torch", "skip"] = Field(
        "auto",
        description="how the teacher is measured: onnx (fp32, dense MoE routing, exact; a failed export stops the run with its "
        "cause), torch (PyTorch eager in teacher.dtype; no speed-up is shown against it), skip (no teacher row), "
        "or auto: onnx when its fp32 export's modelled peak fits this machine's memory, else torch "
        "(else skip); the stage says which it chose and why",
    )
    opset: int = Field(17, ge=13, le=21)
    optimization: Literal["basic", "extended"] = "extended"
    parity_atol: float = Field(1e-3, gt=0, le=1e3, description="max |torch - onnx| for float exports")
    qdq_min_sqnr_db: float = Field(30.0, ge=0, le=200, description="min SQNR of the INT8 ONNX vs the torch fake-quant model")
    ptq_baselines: bool = Field(True, description="also export ORT dynamic and static PTQ of the float student (report baselines)")
    ptq_calibration_batches: int = Field(
        16, ge=1, le=MAX_CALIBRATION_BATCHES, description="batches of 4 training windows for static PTQ calibration"
    )
    precisions: list[Literal["fp32", "fp16", "int8", "int4"]] = Field(
        default_factory=lambda: ["fp32", "int8"],
        description="what to write: fp32 (every student stage, always), fp16 (the last float student), int8 (the INT8 QAT student) "
        "and int4 (the int4 QAT student with its trained scales, and the post-training MatMulNBits of the last float student: "
        "ONNX Runtime on CPUs and ARM boards)",
    )
    fp16_max_rel_err: float = Field(
        0.01, gt=0, le=1e3, description="max |onnx fp16 - torch fp32| of the logits, relative to max |torch logits|"
    )
    kv_cache: bool = Field(
        True,
        description="also write a KV-cache graph (<name>.kv.onnx: past_key_values in, present out) of each fp32 student and the "
        "int8 QAT student, for token-by-token generation; bench measures its decode tokens/s",
    )
    device: str | None = Field(
        None,
        description="target device profile: its preferred precision is exported too; a tensorrt device gets a TensorRT-checked graph (and an engine where tensorrt runs)",
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


class _OnnxRuntimeHints:
    """A root-logger filter for the export stage: ONNX Runtime's quantizers log their hints ("consider pre-processing",
    a line per tensor without parameters) on the root logger; they are dropped below ERROR, everything else passes."""

    def filter(self, record) -> bool:
        return record.levelno >= 40 or "onnxruntime" not in record.pathname


@STAGES.register("export")
class ExportStage(Stage[ExportConfig]):
    """ONNX for the teacher (dense routing), each student stage (fp32) and the QAT students (INT8 Q/DQ, int4 MatMulNBits), each
    student also as fused decoder graphs."""

    consumes = ("model", "qat_model", "qat_int4_model")  # every student stage's model, the QAT students there are
    provides = ("artifacts",)
    ranks = "main"  # under torchrun: rank 0 alone, the other ranks wait for its result

    def effective_config(self, spec) -> ExportConfig:
        if self.config.teacher != "auto":
            return self.config
        from dsk_compress.recipes.preflight import teacher_export_plan

        return self.config.model_copy(update={"teacher": teacher_export_plan(spec)[0]})

    def uses_teacher(self, spec) -> bool:
        return spec.student.torch is not None or self.effective_config(spec).teacher != "skip"

    def run(self, ctx: RunContext) -> StageResult:
        import logging
        import warnings

        import torch

        quiet = _OnnxRuntimeHints()
        with warnings.catch_warnings():
            # expected while tracing: TracerWarnings for the constant quantizer scales, the exporters' own notices
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", module=r"(torch\.onnx|onnxruntime|onnx)(\.|$)")
            logging.getLogger().addFilter(quiet)
            try:
                with step_progress("export"):  # minutes of graphs and checks: say which one is under way
                    return self._run(ctx)
            finally:
                logging.getLogger().removeFilter(quiet)

    def _run(self, ctx: RunContext) -> StageResult:
        if is_torch_run(ctx):  # your own torch model: model(x) -> logits, dynamic batch (below)
            return run_torch(self, ctx)
        from dsk_compress.compress.qat import QuantLinear, freeze_for_export, load_qat_model
        from dsk_compress.devices import load_device
        from dsk_compress.export.int8 import export_int8_lm
        from dsk_compress.export.onnx import lm_logits, raw_path
        from dsk_compress.models.source import count_params, load_hf_dir

        c = self.config
        d = ctx.stage_dir("export")
        example = ctx.task.example_inputs(2)
        target = load_device(c.device) if c.device else None
        precisions = list(dict.fromkeys([*c.precisions, *([target.preferred_precision] if target else [])]))
        trt_target = target is not None and target.preferred_runtime == "tensorrt"
        float_stages = [st for st in ("distill", "prune") if ctx.outputs.get(st, {}).get("model")]
        if "fp16" in precisions and not float_stages:
            raise ExportError(
                "fp16 export needs a float student from a distill or prune stage, and this run has neither",
                hint="drop fp16 from stages.N.precisions (and export for a device that does not prefer fp16)",
            )
        qrel = ctx.latest_output("qat_model")
        if target is not None and target.preferred_precision == "int8" and qrel is None:
            raise ExportError(
                f"{target.name} prefers int8, which needs a QAT student, and this run has no qat stage",
                hint="add a qat stage before export" + (" with activations: symmetric" if trt_target else ""),
            )
        acts = _qat_activations(ctx.path(qrel) / "qat.json") if qrel is not None else None
        if trt_target and target.preferred_precision == "int8" and acts != "symmetric":  # before any export work
            qi = next((i for i, st in enumerate(ctx.spec.stages) if st.stage == "qat"), "N")
            raise ExportError(
                f"{target.name} runs int8 in TensorRT, which needs symmetric int8 activations (zero point 0), "
                f"but the QAT model was trained with {acts} (uint8) ones",
                hint=f"set stages.{qi}.activations: symmetric (qat.activations=symmetric) and rerun the qat stage",
            )

        # the teacher (dense routing, exact) and the baselines of earlier stages, fp32
        artifacts: dict[str, dict] = {}
        teacher_art = self._teacher(ctx, d, example)
        if teacher_art is not None:
            artifacts["teacher"] = teacher_art
        ctx.release_teacher()  # no later step runs it (bench measures the files written here): its memory goes to the students
        for stage in ("distill", "prune"):
            for bname, rel in ctx.outputs.get(stage, {}).get("baselines", {}).items():
                m = load_hf_dir(ctx.path(rel))
                role, note = BASELINE_ROLES[(stage, bname)]
                artifacts[role] = {
                    **self._float(ctx, m, role, d, example),
                    "role": role,
                    "params": count_params(m),
                    "stage": stage,
                    "model_dir": rel,
                    "notes": note,
                }

        # each float student: fp32 (+ KV cache), fp16 of the last one, PTQ baselines of the one QAT started from
        qat_input = ctx.latest_output("model", before="qat")
        metrics: dict = {"precisions": precisions, "device": target.name if target else None}
        for stage in float_stages:
            rel = ctx.outputs[stage]["model"]
            m = load_hf_dir(ctx.path(rel))
            name = f"student-{stage}"
            want_ptq = c.ptq_baselines and rel == qat_input and "qat" in ctx.outputs
            want_fp16 = "fp16" in precisions and stage == float_stages[-1]
            artifacts[name] = {
                **self._float(ctx, m, name, d, example, keep_raw=want_ptq or want_fp16),
                "role": "student",
                "params": count_params(m),
                "stage": stage,
                "model_dir": rel,
                "notes": f"after {stage}",
            }
            if c.kv_cache:
                artifacts[name].update(self._kv_cache(ctx, m, name, d, example))
                artifacts[name].update(self._fused(ctx, m, name, d, example, "fp32"))
            artifacts[name]["notes"] = "; ".join([artifacts[name]["notes"], *self._family_notes(ctx, artifacts[name])])
            if "int4" in precisions and stage == float_stages[-1]:
                artifacts["student-int4"] = self._int4(ctx, m, artifacts[name], d, example)
            raw = raw_path(d / f"{name}.onnx")
            if want_fp16:
                artifacts["student-fp16"] = self._fp16(ctx, m, raw, d, example, artifacts[name])
                if trt_target and target.preferred_precision == "fp16":
                    ref = lm_logits(m, example).astype(np.float64)
                    metrics["tensorrt"] = artifacts["student-fp16"]["tensorrt"] = self._tensorrt(
                        ctx, target, ctx.path(artifacts["student-fp16"]["path"]), "fp16", "student-fp16", ref, example
                    )
            if want_ptq:
                artifacts.update(self._ptq(ctx, d, raw, artifacts[name]["params"], name))  # removes raw
            else:
                graph_files.remove(raw)

        # the QAT student: INT8 Q/DQ (+ KV cache), and what TensorRT builds from it
        if qrel is not None and "int8" in precisions:
            q = load_qat_model(ctx.path(qrel))
            freeze_for_export(q)  # fixed weight scales: constants in every int8 graph below
            trt_int8 = trt_target and target.preferred_precision == "int8"
            ref = lm_logits(q, example).astype(np.float64) if trt_int8 else None
            qdq = d / "student-int8.qdq.onnx"  # portable Q/DQ graph: what TensorRT (or any ORT) loads
            step("final: INT8 Q/DQ graph of the QAT student, checked by SQNR")
            r = export_int8_lm(q, example, qdq, d / "student-int8.onnx", c.opset, c.optimization, min_sqnr_db=c.qdq_min_sqnr_db)
            artifacts["final"] = {
                "path": ctx.rel(r.pop("path")),
                "role": "final",
                "precision": "int8",
                "params": count_params(q),
                "qdq_path": ctx.rel(r.pop("qdq_path")),
                "activations": acts,
                **r,
                "notes": f"INT8 Q/DQ (per-channel weights, per-tensor {acts} activations), LM head "
                f"{'int8' if isinstance(q.get_output_embeddings(), QuantLinear) else 'float'}, embedding "
                f"{'int8 per row' if r.get('int8_embeddings') else 'float'}",
            }
            if c.kv_cache:
                artifacts["final"].update(self._kv_cache(ctx, q, "student-int8", d, example, int8=True))
                artifacts["final"].update(self._fused(ctx, q, "student-int8", d, example, "int8"))
            if trt_int8:
                metrics["tensorrt"] = artifacts["final"]["tensorrt"] = self._tensorrt(
                    ctx, target, qdq, "int8", "student-int8", ref, example
                )
        elif qrel is not None:
            metrics["int8_skipped"] = "int8 is not in stages.N.precisions"
        q4rel = ctx.latest_output("qat_int4_model")
        if q4rel is not None and "int4" in precisions:
            artifacts["final-int4"] = self._int4_qat(ctx, q4rel, d, example)
        elif q4rel is not None:
            metrics["int4_skipped"] = "int4 is not in stages.N.precisions"
        if getattr(self, "teacher_choice", None):
            metrics["teacher_export"] = self.teacher_choice
        metrics["artifacts"] = artifacts
        return StageResult(outputs={"artifacts": typed(artifacts)}, metrics=metrics)

    def _int4_qat(self, ctx: RunContext, rel: str, d: Path, example) -> dict:
        """The int4 QAT student as MatMulNBits graphs packed from its own integers and trained scales (``export/int4.py``):
        full-sequence ``student-int4-qat.onnx`` (what bench scores and times) and, with ``kv_cache``, its KV-cache and fused
        decoder graphs; each checked against the fake-quant torch model (SQNR >= ``qdq_min_sqnr_db``; decoders: greedy tokens equal)."""
        from dsk_compress.compress.qat import load_qat_model
        from dsk_compress.export.int4 import export_int4_kv, export_int4_lm
        from dsk_compress.export.qat_graphs import dequantized
        from dsk_compress.models.source import count_params

        c = self.config
        q = load_qat_model(ctx.path(rel))
        with dequantized(q):  # the model's own weights, not its block scales (the file size counts those)
            params = count_params(q)
        info = read_json(ctx.path(rel) / "qat.json")
        step("final-int4: int4 QAT graph (MatMulNBits, trained scales), checked by SQNR")
        r = export_int4_lm(q, example, d / "student-int4-qat.onnx", c.opset, c.optimization, min_sqnr_db=c.qdq_min_sqnr_db)
        head = {None: "float", 4: "int4", 8: "int8"}[info.get("head_bits")]
        emb = "int8 per row" if info.get("embedding_bits") == 8 else "float"
        art = {
            **r,
            "path": ctx.rel(r["path"]),
            "role": "final-int4",
            "params": params,
            "stage": "qat",
            "model_dir": rel,
            "notes": f"int4 QAT: MatMulNBits (block {info.get('block_size')}, symmetric, trained scales; int8 activations per block, "
            f"accuracy_level 4), LM head {head}, embedding {emb}",
        }
        if c.kv_cache:
            step("final-int4: KV-cache graph, checked by greedy decoding")
            kv = export_int4_kv(q, d / "student-int4-qat.kv.onnx", example, c.opset, c.optimization, min_sqnr_db=c.qdq_min_sqnr_db)
            if "error" in kv:
                art["kv_cache"] = kv
            else:
                kv["path"] = ctx.rel(kv["path"])
                art.update({"kv_cache_path": kv["path"], "kv_cache": kv})
            art.update(self._fused(ctx, q, "student-int4-qat", d, example, "int4"))
        art["notes"] = "; ".join([art["notes"], *self._family_notes(ctx, art)])
        return art

    @staticmethod
    def _family_notes(ctx: RunContext, art: dict) -> list[str]:
        """What the student cut and the exports could not do for the teacher's family, and why a graph is missing."""
        from dsk_compress.compress.moe import student_notes

        notes = []
        if ctx.spec.student.from_teacher is not None:
            notes += student_notes(ctx.teacher_config())
        fused = art.get("fused")
        if isinstance(fused, dict) and fused.get("error"):
            notes.append(f"no fused decoder graph: {fused['error']}")
        kv = art.get("kv_cache")
        if isinstance(kv, dict) and kv.get("error"):
            notes.append(f"no KV-cache graph: {kv['error']}")
        return notes

    def _teacher(self, ctx: RunContext, d: Path, example) -> dict | None:
        """The teacher as ``export.teacher`` says: ONNX (dense MoE routing, exact; a failed export is a one-line ExportError
        naming the cause), PyTorch eager (``torch``: the report marks speed-ups against it) or not at all (``skip``)."""
        from dsk_compress.compress.moe import densify_moe, is_moe
        from dsk_compress.models.source import count_params, save_hf_dir

        how, why = self.config.teacher, ""
        if how == "auto":
            from dsk_compress.recipes.preflight import teacher_export_plan

            how, why = teacher_export_plan(ctx.spec)
            step(f"teacher: {how} (export.teacher: auto; {why})")
            print(f"  teacher: measured as {how} (export.teacher: auto; {why})", flush=True)
            self.teacher_choice = {"teacher": how, "why": why}
        if how == "skip":
            return None
        teacher = ctx.teacher()
        if how == "torch":
            import torch

            dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(teacher.parameters()).dtype, "fp32")
            tdir = save_hf_dir(teacher, d / "teacher-torch")
            return {
                "path": None,
                "model_dir": ctx.rel(tdir),
                "role": "teacher",
                "params": count_params(teacher),
                "precision": dt,
                "notes": f"measured in PyTorch eager, {dt} (export.teacher: {self.config.teacher}{'; ' + why if why else ''}); "
                "the other rows run in ONNX Runtime",
            }
        if next(teacher.parameters()).dtype != __import__("torch").float32:
            teacher = teacher.float()  # the ONNX reference row is fp32 (in place: the run releases the teacher after export)
        routing = "dense" if is_moe(teacher) else "n/a"
        densify_moe(teacher)
        try:
            return {
                **self._float(ctx, teacher, "teacher", d, example),
                "role": "teacher",
                "params": count_params(teacher),
                "notes": f"{type(teacher).__name__}, {routing} routing (exact)" + (f"; export.teacher: auto ({why})" if why else ""),
            }
        except ExportError as e:
            i = next((i for i, st in enumerate(ctx.spec.stages) if st.stage == "export"), "N")
            raise ExportError(
                f"teacher ({type(teacher).__name__}): {e.message}",
                hint=f"set stages.{i}.teacher: torch to measure it in PyTorch eager (its speed-ups are then marked "
                f"as against PyTorch), or stages.{i}.teacher: skip",
            ) from None

    def _float(self, ctx: RunContext, model, name: str, d: Path, example, keep_raw: bool = False) -> dict:
        """``<name>.onnx`` in fp32, checked against torch (a causal LM, or your own torch model)."""
        from dsk_compress.export.cnn import export_float as export_module_float
        from dsk_compress.export.onnx import export_float

        step(f"{name}: fp32 ONNX, checked against torch")
        c = self.config
        export = export_module_float if is_torch_run(ctx) else export_float
        info = export(model, example, d / f"{name}.onnx", c.opset, c.optimization, c.parity_atol, keep_raw)
        return {**info, "path": ctx.rel(info["path"])}

    def _kv_cache(self, ctx: RunContext, model, name: str, d: Path, example, int8: bool = False) -> dict:
        """The KV-cache graph ``<name>.kv.onnx`` of a decoder student, checked by greedy decoding against torch.

        A model the KV exporter cannot handle gets ``kv_cache.error`` (the full-sequence artifact stands);
        a KV graph that disagrees with torch is an ExportError, as for the full-sequence graphs.
        """
        from dsk_compress.export.kv_cache import export_kv_cache, is_decoder_lm

        c = self.config
        if not is_decoder_lm(model):  # e.g. an image classifier: nothing to decode
            return {}
        step(f"{name}: KV-cache graph, checked by greedy decoding")
        info = export_kv_cache(
            model,
            d / f"{name}.kv.onnx",
            example,
            c.opset,
            c.optimization,
            parity_atol=c.parity_atol,
            min_sqnr_db=c.qdq_min_sqnr_db,
            int8=int8,
        )
        if "error" in info:
            return {"kv_cache": info}
        info["path"] = ctx.rel(info["path"])
        return {"kv_cache_path": info["path"], "kv_cache": info}

    def _fused(self, ctx: RunContext, model, name: str, d: Path, example, precision: str) -> dict:
        """The fused decoder graph ``<name>.fused.onnx`` (export.fused: ORT contrib operators, shared KV buffer), checked by
        greedy decoding against torch; the bench stage decodes with it. A model the builder does not support gets
        ``fused.error`` (the other graphs stand); one that disagrees with torch is an ExportError."""
        from dsk_compress.export.fused import export_fused_checked
        from dsk_compress.export.kv_cache import is_decoder_lm

        c = self.config
        if not is_decoder_lm(model):
            return {}
        step(f"{name}: fused {precision} decoder graph, checked by greedy decoding")
        info = export_fused_checked(
            model, d / f"{name}.fused.onnx", precision, example, parity_atol=c.parity_atol, min_sqnr_db=c.qdq_min_sqnr_db
        )
        if "error" in info:
            return {"fused": info}
        info["path"] = ctx.rel(info["path"])
        return {"fused_path": info["path"], "fused": info}

    def _int4(self, ctx: RunContext, model, fp32_art: dict, d: Path, example) -> dict:
        """int4 weight-only of a float student (MatMulNBits, block 32, symmetric; ONNX Runtime's quantizer): its
        full-sequence graph ``student-int4.onnx`` (what the bench stage scores and times, like every variant) and, with
        ``kv_cache``, its fused int4 decoder graph; both checked against torch fp32 (SQNR >= ``INT4_MIN_SQNR_DB``)."""
        from dsk_compress.compress.qat import sqnr_db
        from dsk_compress.export.fused import INT4_MIN_SQNR_DB, quantize_int4
        from dsk_compress.export.onnx import fused_ops, lm_logits, op_histogram, ort_predict

        step("student-int4: int4 weight-only graph")
        out = quantize_int4(ctx.path(fp32_art["path"]), d / "student-int4.onnx")
        sqnr = round(sqnr_db(lm_logits(model, example), ort_predict(out)(example)), 2)
        if sqnr < INT4_MIN_SQNR_DB:
            raise ExportError(
                f"{out.name}: int4 logits SQNR {sqnr} dB vs torch fp32 is below {INT4_MIN_SQNR_DB} dB",
                hint="drop int4 from stages.N.precisions",
            )
        art = {
            "path": ctx.rel(out),
            "role": "student-int4",
            "precision": "int4",
            "params": fp32_art["params"],
            "stage": fp32_art["stage"],
            "model_dir": fp32_art["model_dir"],
            "sqnr_db_vs_fp32": sqnr,
            "fused_ops": fused_ops(op_histogram(out)),
            "notes": f"int4 weight-only of student-{fp32_art['stage']} (MatMulNBits, block 32, symmetric; int8 compute, accuracy_level 4)",
        }
        if self.config.kv_cache:
            art.update(self._fused(ctx, model, "student-int4", d, example, "int4"))
        return art

    def _fp16(self, ctx: RunContext, model, raw: Path, d: Path, example, fp32_art: dict) -> dict:
        """fp16 ONNX of a float student (RMSNorm reductions and softmax kept in fp32), checked against torch fp32."""
        from dsk_compress.export.onnx import export_fp16

        step("student-fp16: fp16 graph")
        out = d / "student-fp16.onnx"
        check = export_fp16(model, raw, out, example, self.config.fp16_max_rel_err)
        return {
            "path": ctx.rel(out),
            "role": "student-fp16",
            "precision": "fp16",
            "params": fp32_art["params"],
            "stage": fp32_art["stage"],
            "model_dir": fp32_art["model_dir"],
            **check,
            "notes": f"fp16 of student-{fp32_art['stage']} (normalization reductions and softmax in fp32, fp32 inputs/outputs); "
            "portable graph (no ORT offline optimization), also the TensorRT input",
        }

    def _ptq(self, ctx: RunContext, d: Path, raw: Path, params: int, source: str) -> dict:
        """ORT dynamic and static INT8 quantization of the float student: the baselines QAT must beat. Removes ``raw``."""
        import functools

        from dsk_compress.export.ptq import ptq_baselines, quantize_dynamic_int8, quantize_static_int8

        step(f"ptq-dynamic, ptq-static: ONNX Runtime PTQ of {source}")
        how = {"ptq-dynamic": "ORT quantize_dynamic", "ptq-static": "ORT quantize_static (QDQ, min/max calibration)"}
        head = _qat_quantizes_head(ctx.spec)  # the baselines quantize what QAT does
        quantizers = (functools.partial(quantize_dynamic_int8, head=head), functools.partial(quantize_static_int8, head=head))
        weights = "per-channel int8 weights" + ("" if head else ", LM head float")
        return ptq_artifacts(
            ctx, self.config, d, raw, params, source, functools.partial(ptq_baselines, quantizers=quantizers), how, weights
        )

    def _tensorrt(self, ctx: RunContext, device, onnx_path: Path, precision: str, name: str, ref, example) -> dict:
        """Check ``onnx_path`` for TensorRT and build ``<name>.<device>.engine`` where tensorrt and a GPU are present."""
        from dsk_compress.export.tensorrt import export_tensorrt

        step(f"{name}: TensorRT check" + (" and engine build" if self.config.tensorrt.build_engine else ""))
        t = self.config.tensorrt
        info = export_tensorrt(
            onnx_path,
            onnx_path.with_name(f"{name}.{device.name}.engine"),
            name=name,
            device=device.name,
            precision=precision,
            reference=ref,
            example=example,
            seq_len=t.max_seq_len or ctx.task.seq_len,
            max_batch=t.max_batch,
            opt_batch=t.opt_batch,
            workspace_gb=t.workspace_gb,
            build=t.build_engine,
        )
        info["onnx"] = ctx.rel(info["onnx"])
        if info["engine"] is not None:
            info["engine"] = ctx.rel(info["engine"])
        return info


# ---------------------------------------------------------------------------------------------
# your own torch model: model(x) -> logits with a dynamic batch axis; fp32, ORT PTQ baselines, INT8 Q/DQ


def run_torch(stage: ExportStage, ctx: RunContext) -> StageResult:
    """ONNX (dynamic batch) for the teacher, the float student(s) and baselines, ORT PTQ baselines and the QAT student in INT8 Q/DQ."""
    from dsk_compress.compress.qat import freeze_for_export
    from dsk_compress.export.int8 import export_int8_module
    from dsk_compress.export.onnx import raw_path
    from dsk_compress.models.source import count_params, load_model_dir

    c = stage.config
    unsupported = [p for p in c.precisions if p in ("fp16", "int4")] + (["device"] if c.device else [])
    if unsupported:
        raise ExportError(
            f"export {' and '.join(unsupported)} is not supported for torch students yet", hint="use precisions: [fp32, int8] and no device"
        )
    d = ctx.stage_dir("export")
    example = ctx.task.example_inputs(2)
    artifacts: dict[str, dict] = {}
    teacher = ctx.teacher()
    artifacts["teacher"] = {
        **stage._float(ctx, teacher, "teacher", d, example),
        "role": "teacher",
        "params": count_params(teacher),
        "notes": f"{type(teacher).__name__} from {ctx.spec.teacher.torch}, fp32",
    }
    for rel in ctx.outputs.get("prune", {}).get("baselines", {}).values():
        m = load_model_dir(ctx.path(rel))
        artifacts["pruned-oneshot"] = {
            **stage._float(ctx, m, "pruned-oneshot", d, example),
            "role": "pruned-oneshot",
            "params": count_params(m),
            "stage": "prune",
            "model_dir": rel,
            "notes": "pruned to the same widths in one step, same total fine-tune budget, fp32",
        }
    qrel = ctx.latest_output("qat_model")
    qat_input = ctx.latest_output("model", before="qat")
    rel = ctx.outputs.get("prune", {}).get("model")
    name, m = ("student-prune", load_model_dir(ctx.path(rel))) if rel else ("student", torch_student(ctx, "export"))
    want_ptq = c.ptq_baselines and qrel is not None and rel == qat_input
    artifacts[name] = {
        **stage._float(ctx, m, name, d, example, keep_raw=want_ptq),
        "role": "student",
        "params": count_params(m),
        "stage": "prune" if rel else "input",
        "model_dir": rel,
        "notes": "after prune, fp32" if rel else "the student as given, fp32",
    }
    if want_ptq:
        artifacts.update(_torch_ptq(stage, ctx, d, raw_path(d / f"{name}.onnx"), artifacts[name]["params"], name))
    metrics: dict = {"precisions": list(c.precisions), "device": None}
    if qrel is not None and "int8" in c.precisions:
        q = load_model_dir(ctx.path(qrel))
        freeze_for_export(q)
        r = export_int8_module(
            q,
            example,
            ctx.task.example_inputs(32),
            d / "student-int8.qdq.onnx",
            d / "student-int8.onnx",
            c.opset,
            c.optimization,
            min_sqnr_db=c.qdq_min_sqnr_db,
        )
        qi = read_json(ctx.path(qrel) / "dsk_model.json").get("qat", {})
        artifacts["final"] = {
            "path": ctx.rel(r.pop("path")),
            "role": "final",
            "precision": "int8",
            "params": count_params(q),
            "qdq_path": ctx.rel(r.pop("qdq_path")),
            "activations": qi.get("activations"),
            **r,
            "notes": f"INT8 Q/DQ (BatchNorm folded, per-channel weights, per-tensor {qi.get('activations')} activations)",
        }
    elif qrel is not None:
        metrics["int8_skipped"] = "int8 is not in stages.N.precisions"
    if not want_ptq and c.ptq_baselines:
        metrics["ptq_skipped"] = "PTQ baselines quantize the float student QAT started from; this run has no qat stage"
    metrics["artifacts"] = artifacts
    return StageResult(outputs={"artifacts": typed(artifacts)}, metrics=metrics)


def _torch_ptq(stage: ExportStage, ctx: RunContext, d: Path, raw: Path, params: int, source: str) -> dict:
    """ORT dynamic and static INT8 quantization of every Conv and Linear of the float student: the baselines QAT must beat."""
    from dsk_compress.export.cnn import integer_op_counts, ptq_baselines
    from dsk_compress.export.onnx import op_histogram

    how = {
        "ptq-dynamic": "ORT quantize_dynamic (ConvInteger / dynamic MatMul)",
        "ptq-static": "ORT quantize_static (QDQ, min/max calibration)",
    }
    return ptq_artifacts(
        ctx,
        stage.config,
        d,
        raw,
        params,
        source,
        ptq_baselines,
        how,
        "per-channel 7-bit int8 weights",
        extra=lambda p: {"integer_ops": integer_op_counts(op_histogram(p))},
    )


def ptq_artifacts(ctx: RunContext, c, d: Path, raw: Path, params: int, source: str, baselines, how: dict, weights: str, extra=None) -> dict:
    """The artifacts of ONNX Runtime's PTQ baselines of the float graph ``raw`` (removed after): ``baselines(raw, d,
    calibration, optimization)`` writes them, ``how`` names each method, ``extra(path)`` adds fields to an entry."""
    from dsk_compress.export.onnx import fused_ops, op_histogram

    paths = baselines(raw, d, ctx.task.calibration_batches(c.ptq_calibration_batches, 4), c.optimization)
    graph_files.remove(raw)
    return {
        name: {
            "path": ctx.rel(p),
            "role": name,
            "precision": "int8",
            "params": params,
            "fused_ops": fused_ops(op_histogram(p)),
            **(extra(p) if extra else {}),
            "notes": f"{how[name]} of {source}, {weights}, no fine-tune",
        }
        for name, p in paths.items()
    }


def _qat_quantizes_head(spec) -> bool:
    """Whether the recipe's int8 QAT quantizes the LM head (its ``skip`` does not name ``lm_head``; no qat stage: the
    qat stage's default)."""
    from dsk_compress.compress.qat import skipped
    from dsk_compress.recipes.stages.qat import QATConfig

    qat = next((st for st in spec.stages if st.stage == "qat"), None)
    return not skipped("lm_head", qat.skip if qat is not None else QATConfig().skip)


def _qat_activations(path: Path) -> str:
    """The QAT student's activation scheme from its ``qat.json`` (a damaged file is a one-line RunError naming it)."""
    from dsk_compress.errors import RunError

    info = read_json(path)
    if not isinstance(info, dict) or info.get("activations", "asymmetric") not in ("asymmetric", "symmetric"):
        raise RunError(f"{path} is damaged (no valid 'activations')", hint="re-run the qat stage (--resume --rerun-from qat)")
    return info.get("activations", "asymmetric")


def typed(artifacts: dict) -> dict:
    """The export stage's entries checked as :class:`~dsk_compress.artifacts.Artifact` (a wrong field fails here, not in
    bench or a bundle), in the manifest's JSON form."""
    return artifacts_json(read_artifacts(artifacts, "the export stage's artifacts"))
