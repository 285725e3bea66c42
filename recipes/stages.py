"""The built-in stages: distill -> prune -> qat -> export -> bench (each registered by name)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from dsk_compress.errors import ExportError
from dsk_compress.recipes.runner import STAGES, RunContext, Stage, StageResult
from dsk_compress.recipes.schema import BenchStageConfig, DistillConfig, ExportConfig, PruneConfig, QATConfig

# each stage reads its own slice of the training stream
_DATA_OFFSETS = {"distill": 0, "prune": 1_000_000, "qat": 2_000_000}


def _evaluate(ctx: RunContext, model) -> dict:
    from dsk_compress.models.zoo import torch_predict

    model.eval()
    return ctx.task.evaluate(torch_predict(model)).as_dict()


def _train_cfg(c, data_offset: int, seed: int, steps: int | None = None):
    from dsk_compress.compress.trainer import TrainConfig

    return TrainConfig(steps=c.steps if steps is None else steps, batch_size=c.batch_size, lr=c.lr, warmup=min(c.warmup, max(0, (steps or c.steps) // 5)),
                       eval_every=c.eval_every, ckpt_every=50, seed=seed, data_offset=data_offset,
                       early_stop_patience=c.early_stop_patience)


def _kd_train(ctx: RunContext, model, c, stage: str, ckpt: Path, steps: int | None = None, data_offset: int = 0, params=None):
    from dsk_compress.compress.distill import make_kd_loss_fn
    from dsk_compress.compress.trainer import train

    cache = ctx.logit_cache() if c.kd_weight > 0 else None
    # with a logit cache every KD stage reads the same data stream, so later stages hit the cache
    offset = 0 if cache is not None else _DATA_OFFSETS[stage] + data_offset
    cfg = _train_cfg(c, offset, ctx.spec.seed, steps)
    if cfg.steps == 0:
        return None
    if cache is not None and c.reverse_kl > 0:
        from dsk_compress.errors import RecipeError

        raise RecipeError("reverse_kl needs the full teacher distribution", hint="disable logit_cache or set reverse_kl: 0")
    loss_fn = make_kd_loss_fn(ctx.teacher(), c.temperature, c.kd_weight, cache=cache, reverse_kl=c.reverse_kl)
    ev = (lambda m: _evaluate(ctx, m)) if c.eval_every else None
    hits0, misses0 = (cache.hits, cache.misses) if cache else (0, 0)
    res = train(model, loss_fn, ctx.task.train_batch, cfg, ckpt_dir=ckpt, resume=ctx.resume, evaluate=ev, desc=stage, params=params)
    res.kd = {"teacher": "cached top-%d logits" % cache.k, "cache_hits": cache.hits - hits0, "cache_misses": cache.misses - misses0} if cache else \
        {"teacher": "online" if c.kd_weight > 0 else "none"}
    return res


def _train_summary(res) -> dict:
    if res is None:
        return {"steps": 0}
    return {"steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 1), "tokens_per_s": round(res.tokens_per_s, 1),
            "final_loss": round(res.final_loss, 4), "kd": getattr(res, "kd", None), "history": res.history}


def _student_model(ctx: RunContext, before: str):
    from dsk_compress.models.source import load_hf_dir, load_model_source

    rel = ctx.latest_output("model", before=before)
    if rel is not None:
        return load_hf_dir(ctx.path(rel))
    st = ctx.spec.student
    if st.from_teacher is not None:
        from dsk_compress.errors import RecipeError

        raise RecipeError(f"the {before!r} stage needs a student: add a 'distill' stage before it or give student: {{hf: DIR}}")
    return load_model_source(st.model_dump(exclude_none=True, exclude={"from_teacher"}))


@STAGES.register("distill")
class DistillStage(Stage[DistillConfig]):
    """Cut a dense student from the teacher and train it with logit KD + hard-label CE."""

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.compress.student import build_student
        from dsk_compress.models.source import count_params, load_hf_dir, load_model_source, save_hf_dir

        d = ctx.stage_dir("distill")
        teacher = ctx.teacher()
        st = ctx.spec.student
        init_dir = d / "init"
        info: dict = {}
        if (init_dir / "config.json").is_file():
            student = load_hf_dir(init_dir)  # resume: the very same initialisation
            info = json.loads((init_dir / "dsk_compress.json").read_text()) if (init_dir / "dsk_compress.json").is_file() else {}
        elif st.from_teacher is not None:
            ft = st.from_teacher
            student, info = build_student(
                teacher, layers=ft.layers, keep_every=ft.keep_every, intermediate_size=ft.intermediate_size,
                ffn_init=ft.ffn_init, calibration=ctx.task.calibration_batches(ft.calibration_batches), seed=ctx.spec.seed,
            )
            save_hf_dir(student, init_dir, extra=info)
        else:
            student = load_model_source(st.model_dump(exclude_none=True, exclude={"from_teacher"}))
        task_vocab = getattr(ctx.task, "vocab_size", None)
        if task_vocab is not None and task_vocab > teacher.config.vocab_size:
            from dsk_compress.errors import RecipeError

            raise RecipeError(f"the task's tokenizer has {task_vocab} tokens but the teacher's vocabulary has {teacher.config.vocab_size}",
                              hint="use the teacher's own tokenizer (task.tokenizer: the teacher's directory)")
        if getattr(student.config, "vocab_size", None) != getattr(teacher.config, "vocab_size", None):
            from dsk_compress.errors import RecipeError

            raise RecipeError(f"student vocabulary ({student.config.vocab_size}) differs from the teacher's ({teacher.config.vocab_size})")
        init_metrics = _evaluate(ctx, student)
        res = _kd_train(ctx, student, self.config, "distill", d / "checkpoint")
        metrics = {"init": init_metrics, "student_init": info, "params": count_params(student),
                   "train": _train_summary(res), **_evaluate(ctx, student)}
        save_hf_dir(student, d / "model")
        baselines = {}
        for name in self.config.baselines:
            baselines[name], metrics[f"baseline_{name}"] = self._baseline(ctx, name, init_dir, d / "baselines" / name)
        return StageResult(outputs={"model": ctx.rel(d / "model"), "baselines": baselines}, metrics=metrics)

    def _baseline(self, ctx: RunContext, name: str, init_dir: Path, bdir: Path) -> tuple[str, dict]:
        """The comparison students: same token budget, without KD (same init) or with a random FFN init."""
        from dsk_compress.compress.student import build_student
        from dsk_compress.models.source import load_hf_dir, save_hf_dir

        if (bdir / "model" / "config.json").is_file() and (bdir / "metrics.json").is_file():
            return ctx.rel(bdir / "model"), json.loads((bdir / "metrics.json").read_text())
        c = self.config
        ft = ctx.spec.student.from_teacher
        if name == "nokd":
            model = load_hf_dir(init_dir)
            cfg = c.model_copy(update={"kd_weight": 0.0})
        else:
            if ft is None:
                from dsk_compress.errors import RecipeError

                raise RecipeError("the random-init baseline needs student.from_teacher")
            model, _ = build_student(ctx.teacher(), layers=ft.layers, keep_every=ft.keep_every,
                                     intermediate_size=ft.intermediate_size, ffn_init="random", seed=ctx.spec.seed)
            cfg = c
        init = _evaluate(ctx, model)
        res = _kd_train(ctx, model, cfg, "distill", bdir / "checkpoint")
        metrics = {"init": init, "train": _train_summary(res), **_evaluate(ctx, model)}
        save_hf_dir(model, bdir / "model")
        from dsk_compress.io import atomic_write_json

        atomic_write_json(bdir / "metrics.json", metrics)
        return ctx.rel(bdir / "model"), metrics


@STAGES.register("prune")
class PruneStage(Stage[PruneConfig]):
    """Structured pruning of FFN channels / heads (uniform per layer), KD fine-tune after each step."""

    def _schedule(self, ctx: RunContext, model, before: dict, iterations: int, steps: int, d: Path, example) -> tuple:
        """Prune to the target in ``iterations`` slices with ``steps`` KD fine-tune steps after each slice."""
        from dsk_compress.compress.distill import kd_loss
        from dsk_compress.compress.prune import prune_step, structure
        from dsk_compress.io import atomic_write_json
        from dsk_compress.models.source import load_hf_dir, save_hf_dir

        c = self.config
        log = []
        for it in range(iterations):
            step_dir = d / f"iter{it}"
            if (step_dir / "model" / "config.json").is_file():  # resume: this iteration is complete
                model = load_hf_dir(step_dir / "model")
                log.append(json.loads((step_dir / "metrics.json").read_text()))
                continue
            # ratio of the *current* size that brings the model to keep**((it+1)/iterations) of the original
            target_ffn = before["layers"][0]["ffn"] * (1 - c.ffn_ratio) ** ((it + 1) / iterations)
            target_heads = before["layers"][0]["heads"] * (1 - c.head_ratio) ** ((it + 1) / iterations)
            cur = structure(model)["layers"][0]
            ffn_r = max(0.0, 1 - target_ffn / cur["ffn"])
            head_r = max(0.0, 1 - round(target_heads) / cur["heads"]) if c.head_ratio > 0 else 0.0
            calib = torch.as_tensor(ctx.task.train_batch(3_000_000 + it, 8))

            def taylor_loss(m, x=calib):
                s = m(input_ids=x, use_cache=False).logits
                with torch.no_grad():
                    t = ctx.teacher()(input_ids=x, use_cache=False).logits
                return kd_loss(s, t, x, c.temperature, c.kd_weight)[0]

            after = prune_step(model, example, ffn_r, head_r, c.importance, c.round_to, c.timeout_s, taylor_loss)
            pruned_acc = _evaluate(ctx, model)
            res = _kd_train(ctx, model, c, "prune", step_dir / "checkpoint", steps=steps, data_offset=it * 100_000)
            entry = {"iteration": it, "structure": after, "accuracy_after_prune": pruned_acc["accuracy"],
                     "train": _train_summary(res), **_evaluate(ctx, model)}
            save_hf_dir(model, step_dir / "model")
            atomic_write_json(step_dir / "metrics.json", entry)
            log.append(entry)
        return model, log

    def run(self, ctx: RunContext) -> StageResult:
        import torch_pruning as tp

        from dsk_compress.compress.prune import check_prunable, structure
        from dsk_compress.models.source import save_hf_dir

        c = self.config
        d = ctx.stage_dir("prune")
        model = _student_model(ctx, "prune")
        check_prunable(model.config, c.ffn_ratio, c.head_ratio, c.round_to)
        example = torch.as_tensor(ctx.task.example_inputs(1))
        macs0, params0 = tp.utils.count_ops_and_params(model, example_inputs={"input_ids": example, "use_cache": False})
        before = structure(model)
        acc_before = _evaluate(ctx, model)
        start = {k: v.clone() for k, v in model.state_dict().items()} if c.baselines else None
        model, log = self._schedule(ctx, model, before, c.iterations, c.steps, d, example)
        macs1, params1 = tp.utils.count_ops_and_params(model, example_inputs={"input_ids": example, "use_cache": False})
        save_hf_dir(model, d / "model")
        metrics = {
            "structure_before": before, "structure_after": structure(model), "accuracy_before": acc_before["accuracy"],
            "params_before": int(params0), "params_after": int(params1), "macs_before": int(macs0), "macs_after": int(macs1),
            "mac_reduction": round(1 - macs1 / macs0, 4), "iterations": log, **_evaluate(ctx, model),
        }
        baselines = {}
        if "oneshot" in c.baselines:  # same target, one slice, the same total fine-tune budget
            one = _student_model(ctx, "prune")
            one.load_state_dict(start)
            one, one_log = self._schedule(ctx, one, before, 1, c.steps * c.iterations, d / "baselines" / "oneshot", example)
            save_hf_dir(one, d / "baselines" / "oneshot" / "model")
            baselines["oneshot"] = ctx.rel(d / "baselines" / "oneshot" / "model")
            metrics["baseline_oneshot"] = {"iterations": one_log, **_evaluate(ctx, one)}
        return StageResult(outputs={"model": ctx.rel(d / "model"), "baselines": baselines}, metrics=metrics)


def save_qat_model(model, path: Path, qat_info: dict) -> Path:
    from dsk_compress.io import atomic_write_json, save_state_dict

    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_state_dict(model.state_dict(), path / "qat_state.safetensors")
    atomic_write_json(path / "qat.json", qat_info)
    return path


def load_qat_model(path: Path):
    """Rebuild a QAT model: the config's architecture, QuantLinear layers, then the saved state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsk_compress.compress.qat import prepare_qat
    from dsk_compress.io import load_state_dict

    info = json.loads((path / "qat.json").read_text())
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    prepare_qat(model, info["weight_bits"], info["avx2_safe"], info["skip"])
    model.load_state_dict(load_state_dict(path / "qat_state.safetensors"), strict=False)
    return model.eval()


@STAGES.register("qat")
class QATStage(Stage[QATConfig]):
    """INT8 QAT: observe activation ranges, then KD fine-tune with learned activation scales."""

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.compress.qat import calibrate, prepare_qat, quant_layers

        c = self.config
        d = ctx.stage_dir("qat")
        model = _student_model(ctx, "qat")
        float_metrics = _evaluate(ctx, model)
        names = prepare_qat(model, c.weight_bits, c.avx2_safe, c.skip)
        calibrate(model, ctx.task.calibration_batches(c.observer_steps, c.batch_size))
        ptq_metrics = _evaluate(ctx, model)
        res = _kd_train(ctx, model, c, "qat", d / "checkpoint")
        info = {"version": 1, "weight_bits": c.weight_bits, "activation_bits": 8, "avx2_safe": c.avx2_safe, "skip": c.skip,
                "quantized_layers": names, "weight_qmax": quant_layers(model)[0].qmax if names else None}
        save_qat_model(model, d / "model", info)
        metrics = {"float": float_metrics, "after_calibration": ptq_metrics, "quantized_layers": len(names),
                   "train": _train_summary(res), **_evaluate(ctx, model)}
        return StageResult(outputs={"qat_model": ctx.rel(d / "model")}, metrics=metrics)


@STAGES.register("export")
class ExportStage(Stage[ExportConfig]):
    """ONNX for the teacher (dense routing), each student stage (fp32) and the QAT student (INT8 Q/DQ)."""

    def _float(self, ctx, model, name: str, d: Path, example, keep_raw: bool = False) -> dict:
        import numpy as np

        from dsk_compress.export.onnx import export_causal_lm, fused_ops, op_histogram, ort_optimize, ort_predict, simplify

        raw = export_causal_lm(model, example, d / f"{name}.raw.onnx", self.config.opset)
        simplify(raw)
        out = ort_optimize(raw, d / f"{name}.onnx", self.config.optimization)
        if not keep_raw:
            raw.unlink()
        with torch.no_grad():
            ref = model(input_ids=torch.as_tensor(example), use_cache=False).logits.numpy()
        diff = float(np.abs(ort_predict(out)(example) - ref).max())
        if diff > self.config.parity_atol:
            raise ExportError(f"{name}: ONNX output differs from torch by {diff:.2e} (> parity_atol {self.config.parity_atol})",
                              hint="raise stages.N.parity_atol or report a bug")
        return {"path": ctx.rel(out), "precision": "fp32", "parity_max_abs_diff": diff, "fused_ops": fused_ops(op_histogram(out))}

    def _ptq(self, ctx, d: Path, raw: Path, params: int, source: str) -> dict:
        """ORT dynamic and static INT8 quantization of the float student: the baselines QAT must beat."""
        from dsk_compress.export.onnx import fused_ops, op_histogram, ort_optimize
        from dsk_compress.export.ptq import quantize_dynamic_int8, quantize_static_int8

        out = {}
        dyn = quantize_dynamic_int8(raw, d / "ptq-dynamic.raw.onnx")
        calib = ctx.task.calibration_batches(self.config.ptq_calibration_batches, 4)
        sta = quantize_static_int8(raw, d / "ptq-static.raw.onnx", calib)
        for name, q, how in (("ptq-dynamic", dyn, "ORT quantize_dynamic"), ("ptq-static", sta, "ORT quantize_static (QDQ, min/max calibration)")):
            final = ort_optimize(q, d / f"{name}.onnx", self.config.optimization)
            q.unlink()
            out[name] = {"path": ctx.rel(final), "role": name, "precision": "int8", "params": params,
                         "fused_ops": fused_ops(op_histogram(final)), "notes": f"{how} of {source}, per-channel int8 weights, no fine-tune"}
        raw.unlink()
        return out

    def run(self, ctx: RunContext) -> StageResult:
        import logging
        import warnings

        with warnings.catch_warnings():
            # TracerWarnings for the constant quantizer scales and ORT's "consider pre-processing" hints are expected
            warnings.simplefilter("ignore")
            level = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)
            try:
                return self._run(ctx)
            finally:
                logging.getLogger().setLevel(level)

    def _run(self, ctx: RunContext) -> StageResult:
        import numpy as np

        from dsk_compress.compress.moe import densify_moe, is_moe
        from dsk_compress.compress.qat import freeze_for_export, quant_layers, sqnr_db
        from dsk_compress.export.onnx import (INTEGER_MATMULS, export_causal_lm, fold_weight_quantizers, fused_ops, op_histogram,
                                              ort_optimize, ort_predict, simplify)
        from dsk_compress.models.source import count_params, load_hf_dir

        d = ctx.stage_dir("export")
        example = ctx.task.example_inputs(2)
        artifacts: dict[str, dict] = {}
        teacher = ctx.teacher()
        routing = "dense" if is_moe(teacher) else "n/a"
        densify_moe(teacher)
        try:
            artifacts["teacher"] = {**self._float(ctx, teacher, "teacher", d, example), "role": "teacher", "params": count_params(teacher),
                                    "notes": f"{type(teacher).__name__}, {routing} routing (exact), fp32"}
        except ExportError as e:  # fall back to eager torch; the report says so
            from dsk_compress.models.source import save_hf_dir

            tdir = save_hf_dir(teacher, d / "teacher-torch")
            artifacts["teacher"] = {"path": None, "model_dir": ctx.rel(tdir), "role": "teacher", "params": count_params(teacher),
                                    "precision": "fp32", "notes": f"ONNX export failed ({e.message}); measured in PyTorch eager"}
        baseline_roles = {("distill", "nokd"): ("student-nokd", "same init and token budget, trained without KD (hard labels only)"),
                          ("distill", "random-init"): ("student-random-init", "KD with a randomly initialised FFN, same token budget"),
                          ("prune", "oneshot"): ("pruned-oneshot", "pruned to the same size in one step, same total fine-tune budget")}
        for stage in ("distill", "prune"):
            for bname, rel in ctx.outputs.get(stage, {}).get("baselines", {}).items():
                m = load_hf_dir(ctx.path(rel))
                role, note = baseline_roles[(stage, bname)]
                artifacts[role] = {**self._float(ctx, m, role, d, example), "role": role, "params": count_params(m), "stage": stage,
                                   "model_dir": rel, "notes": note + ", fp32"}
        qat_input = ctx.latest_output("model", before="qat")  # the float student QAT started from
        for stage in ("distill", "prune"):
            rel = ctx.outputs.get(stage, {}).get("model")
            if rel is None:
                continue
            m = load_hf_dir(ctx.path(rel))
            name = f"student-{stage}"
            artifacts[name] = {**self._float(ctx, m, name, d, example, keep_raw=self.config.ptq_baselines and rel == qat_input),
                               "role": "student", "params": count_params(m), "stage": stage, "model_dir": rel, "notes": f"after {stage}, fp32"}
            if self.config.ptq_baselines and rel == qat_input and "qat" in ctx.outputs:
                artifacts.update(self._ptq(ctx, d, d / f"{name}.raw.onnx", artifacts[name]["params"], name))
        metrics: dict = {}
        qrel = ctx.latest_output("qat_model")
        if qrel is not None:
            q = load_qat_model(ctx.path(qrel))
            freeze_for_export(q)
            with torch.no_grad():
                ref = q(input_ids=torch.as_tensor(example), use_cache=False).logits.numpy()
            raw = export_causal_lm(q, example, d / "student-int8.raw.onnx", self.config.opset)
            simplify(raw)
            folded = fold_weight_quantizers(raw)
            out = ort_optimize(raw, d / "student-int8.onnx", self.config.optimization)
            raw.unlink()
            got = ort_predict(out)(example)
            sqnr = sqnr_db(ref, got)
            hist = op_histogram(out)
            n_int = sum(v for k, v in hist.items() if k in INTEGER_MATMULS)
            n_q = len(quant_layers(q))
            if sqnr < self.config.qdq_min_sqnr_db:
                raise ExportError(f"INT8 ONNX vs torch fake-quant SQNR {sqnr:.1f} dB is below {self.config.qdq_min_sqnr_db} dB")
            if n_int != n_q:
                raise ExportError(f"only {n_int} of {n_q} quantized Linears became integer ops in ONNX Runtime")
            artifacts["final"] = {"path": ctx.rel(out), "role": "final", "precision": "int8", "params": count_params(q),
                                  "sqnr_db_vs_fake_quant": round(sqnr, 2), "max_abs_diff_vs_fake_quant": float(np.abs(got - ref).max()),
                                  "integer_matmuls": n_int, "quantized_linears": n_q, "folded_weights": folded,
                                  "fused_ops": fused_ops(hist), "notes": "INT8 Q/DQ (per-channel weights, per-tensor activations)"}
        metrics["artifacts"] = artifacts
        return StageResult(outputs={"artifacts": artifacts}, metrics=metrics)


@STAGES.register("bench")
class BenchStage(Stage[BenchStageConfig]):
    """Measure every exported variant: accuracy of the artifact in its runtime, latency, size, memory."""

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.devices import load_device
        from dsk_compress.export.onnx import file_size, ort_predict
        from dsk_compress.models.zoo import torch_predict
        from dsk_compress.report import build_report
        from dsk_compress.runtimes import BenchConfig
        from dsk_compress.runtimes.onnxruntime import benchmark_onnx

        c = self.config
        device = load_device(c.device)
        threads = c.threads or device.threads
        artifacts = ctx.latest_output("artifacts") or {}
        inputs = ctx.task.example_inputs(c.batch_size)
        bcfg = BenchConfig(warmup=c.warmup, runs=c.runs, batch_size=c.batch_size, threads=threads)
        variants = []
        for name, art in artifacts.items():
            if art.get("path"):
                path = ctx.path(art["path"])
                acc = ctx.task.evaluate(ort_predict(path, threads)).as_dict()
                bench = benchmark_onnx(path, inputs, bcfg)
                size = file_size(path)
                runtime = "onnxruntime-cpu"
            else:  # torch fallback (e.g. a teacher that does not export)
                from dsk_compress.models.source import load_hf_dir
                from dsk_compress.runtimes.torch import benchmark_torch

                mdir = ctx.path(art["model_dir"])
                acc = ctx.task.evaluate(torch_predict(load_hf_dir(mdir))).as_dict()
                bench = benchmark_torch(mdir, inputs, bcfg)
                size = sum(f.stat().st_size for f in mdir.glob("*.safetensors"))
                runtime = "torch-eager-cpu"
            b = bench.as_dict()
            variants.append({
                "name": name, "role": art["role"], "stage": art.get("stage", name), "params": art["params"], "size_bytes": int(size),
                "accuracy": round(acc["accuracy"], 3),
                "bits_per_byte": round(acc["bits_per_byte"], 4) if "bits_per_byte" in acc else None,
                "metrics": {k: round(v, 4) for k, v in acc.items()},
                "latency_ms": {k: round(b[k], 3) for k in ("p50", "p90", "p99", "mean")},
                "throughput": round(b["throughput"], 2), "peak_memory_mb": b.get("peak_memory_mb"),
                "runtime": runtime, "device": device.name, "precision": art.get("precision", "fp32"),
                "artifact": art.get("path"), "notes": art.get("notes", ""),
            })
        td = ctx.task.describe()
        meta = {"run": ctx.run_dir.name, "recipe": ctx.spec.name,
                "task": f"{td['name']} (seq {td['seq_len']}, {td.get('eval_tokens', '?')} validation tokens)",
                "host": f"{device.name}: {platform.node()} {platform.machine()}, {threads} threads, batch {c.batch_size}, seq {ctx.task.seq_len}",
                "max_accuracy_drop": ctx.spec.report.max_accuracy_drop}
        report = build_report(ctx.run_dir, variants, meta)
        return StageResult(outputs={"report": "report.json"}, metrics={"variants": variants, "summary": report.get("summary")})
