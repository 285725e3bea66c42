"""The prune, qat and export stages for your own torch model (``student: {torch: ...}`` with ``task: {torch: ...}``).

The model is any ``model(x) -> logits`` module built by a factory; the task supplies ``(x, y)``
training batches and scores a ``predict`` function. The stage classes in ``stages.py`` branch here
once, at the top of ``run``; the bench stage is shared (it only needs ONNX files and the task).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dsk_compress.errors import ExportError
from dsk_compress.recipes.base import RunContext, StageResult


def is_torch_run(ctx: RunContext) -> bool:
    """The recipe's student is your own torch model (not a Hugging Face causal LM)."""
    return getattr(ctx.spec.student, "torch", None) is not None


def _student(ctx: RunContext, before: str):
    from dsk_compress.models.source import load_model_dir, load_model_source

    rel = ctx.latest_output("model", before=before)
    if rel is not None:
        return load_model_dir(ctx.path(rel))
    return load_model_source(ctx.spec.student.model_dump(exclude_none=True, exclude={"from_teacher"}))


def _evaluate(ctx: RunContext, model) -> dict:
    from dsk_compress.compress.cnn import torch_predict

    model.eval()
    return ctx.task.evaluate(torch_predict(model)).as_dict()


def _kd_train(ctx: RunContext, model, c, stage: str, ckpt: Path, steps: int | None = None, data_offset: int = 0):
    """Fine-tune ``model`` on the task's ``(x, y)`` batches with logit KD from the run's teacher (the one trainer)."""
    from dsk_compress.compress import dist
    from dsk_compress.compress.cnn import make_classifier_kd_loss
    from dsk_compress.compress.trainer import train
    from dsk_compress.recipes.stages import _DATA_OFFSETS, _train_cfg

    cfg = _train_cfg(c, _DATA_OFFSETS[stage] + data_offset, ctx.spec.seed, steps)
    if cfg.steps == 0:
        return None
    teacher = ctx.teacher() if c.kd_weight > 0 else None
    loss_fn = make_classifier_kd_loss(teacher, c.temperature, c.kd_weight, hard_loss=getattr(ctx.task, "loss", None))
    ev = (lambda m: _evaluate(ctx, m)) if c.eval_every else None
    if teacher is None:
        res = train(model, loss_fn, ctx.task.train_batch, cfg, ckpt_dir=ckpt, resume=ctx.resume, evaluate=ev, desc=stage)
    else:
        t_home = next(teacher.parameters()).device
        teacher.to(dist.device(dist.env(), next(model.parameters()).device))
        try:
            res = train(model, loss_fn, ctx.task.train_batch, cfg, ckpt_dir=ckpt, resume=ctx.resume, evaluate=ev, desc=stage)
        finally:
            teacher.to(t_home)
    res.kd = {"teacher": "online" if teacher is not None else "none"}
    return res


def _summary(res) -> dict:
    from dsk_compress.recipes.stages import _train_summary

    out = _train_summary(res)
    if res is not None:  # the trainer counts batch elements as tokens; here they are samples
        out["samples"] = out.pop("tokens")
        out["samples_per_s"] = out.pop("tokens_per_s")
    return out


# ---------------------------------------------------------------------------------------------
# prune


def run_prune(stage, ctx: RunContext) -> StageResult:
    """Conv output channels to ``channel_ratio`` (rounded to ``round_to``), in ``iterations`` slices with KD after each."""
    from dsk_compress.compress.cnn import conv_widths, count_macs, output_layers, target_widths
    from dsk_compress.models.source import count_params, save_model_dir

    c = stage.config
    d = ctx.stage_dir("prune")
    model = _student(ctx, "prune")
    example = torch.as_tensor(ctx.task.example_inputs(1))
    outs = {id(m) for m in output_layers(model, example)}
    start = {n: w for n, w in conv_widths(model).items() if id(model.get_submodule(n)) not in outs}
    ratio = 0.5 if c.channel_ratio is None else c.channel_ratio
    final = target_widths(start, ratio, c.round_to)
    macs0, params0 = count_macs(model, example), count_params(model)
    acc_before = _evaluate(ctx, model)
    model, log = _schedule(stage, ctx, model, start, final, c.iterations, c.steps, d, example)
    macs1, params1 = count_macs(model, example), count_params(model)
    save_model_dir(model, d / "model")
    after = {n: w for n, w in conv_widths(model).items() if n in start}
    metrics = {
        "structure_before": {"conv_channels": start}, "structure_after": {"conv_channels": after}, "channel_ratio": ratio,
        "round_to": c.round_to, "accuracy_before": acc_before["accuracy"],
        "params_before": int(params0), "params_after": int(params1), "macs_before": int(macs0), "macs_after": int(macs1),
        "mac_reduction": round(1 - macs1 / macs0, 4),
        "macs_counted": f"torch FlopCounterMode over one forward pass on one example input {list(example.shape)}, MACs = FLOPs / 2",
        "importance": c.importance, "iterations": log, **_evaluate(ctx, model),
    }
    baselines = {}
    if "oneshot" in c.baselines:  # same final widths in one slice, the same total fine-tune budget
        bdir = d / "baselines" / "oneshot"
        one, one_log = _schedule(stage, ctx, _student(ctx, "prune"), start, final, 1, c.steps * c.iterations, bdir, example)
        save_model_dir(one, bdir / "model")
        baselines["oneshot"] = ctx.rel(bdir / "model")
        metrics["baseline_oneshot"] = {"iterations": one_log, **_evaluate(ctx, one)}
    return StageResult(outputs={"model": ctx.rel(d / "model"), "baselines": baselines}, metrics=metrics)


def _schedule(stage, ctx: RunContext, model, start: dict, final: dict, iterations: int, steps: int, d: Path, example) -> tuple:
    import torch.nn.functional as F

    from dsk_compress.compress.cnn import interpolate_widths, prune_channels
    from dsk_compress.io import atomic_write_json
    from dsk_compress.models.source import TORCH_DIR_FILE, load_model_dir, save_model_dir

    c = stage.config
    hard = getattr(ctx.task, "loss", None)
    log = []
    for it in range(iterations):
        step_dir = d / f"iter{it}"
        if (step_dir / "model" / TORCH_DIR_FILE).is_file():  # resume: this iteration is complete
            model = load_model_dir(step_dir / "model")
            log.append(json.loads((step_dir / "metrics.json").read_text()))
            continue
        widths = interpolate_widths(start, final, (it + 1) / iterations, c.round_to)
        batch = ctx.task.train_batch(3_000_000 + it, 32)

        def taylor_loss(m, batch=batch):
            out = m(batch[0])
            return hard(out, batch) if hard is not None else F.cross_entropy(out, batch[1])

        after = prune_channels(model, widths, example, c.importance, taylor_loss)
        pruned_acc = _evaluate(ctx, model)
        res = _kd_train(ctx, model, c, "prune", step_dir / "checkpoint", steps=steps, data_offset=it * 100_000)
        entry = {"iteration": it, "structure": {"conv_channels": after}, "accuracy_after_prune": pruned_acc["accuracy"],
                 "train": _summary(res), **_evaluate(ctx, model)}
        save_model_dir(model, step_dir / "model")
        atomic_write_json(step_dir / "metrics.json", entry)
        log.append(entry)
    return model, log


# ---------------------------------------------------------------------------------------------
# qat


def run_qat(stage, ctx: RunContext) -> StageResult:
    """Fold BatchNorm into the convs, fake-quantize every Conv2d and Linear, observe, then KD fine-tune with learned scales."""
    from dsk_compress.compress.cnn import fold_batchnorm, forward
    from dsk_compress.compress.qat import calibrate, prepare_qat, quant_layers
    from dsk_compress.models.source import save_model_dir

    c = stage.config
    d = ctx.stage_dir("qat")
    model = _student(ctx, "qat")
    float_metrics = _evaluate(ctx, model)
    pairs = fold_batchnorm(model, torch.as_tensor(ctx.task.example_inputs(8)))
    names = prepare_qat(model, c.weight_bits, c.avx2_safe, c.skip, activations=c.activations)
    calibrate(model, ctx.task.calibration_batches(c.observer_steps, c.batch_size), forward=forward)
    ptq_metrics = _evaluate(ctx, model)
    res = _kd_train(ctx, model, c, "qat", d / "checkpoint")
    info = {"version": 1, "weight_bits": c.weight_bits, "activation_bits": 8, "activations": c.activations, "avx2_safe": c.avx2_safe,
            "skip": c.skip, "quantized_layers": names, "weight_qmax": quant_layers(model)[0].qmax if names else None}
    save_model_dir(model, d / "model", extra={"bn_folded": [list(p) for p in pairs], "qat": info})
    metrics = {"float": float_metrics, "bn_folded": [b for _, b in pairs], "after_calibration": ptq_metrics,
               "quantized_layers": len(names), "train": _summary(res), **_evaluate(ctx, model)}
    return StageResult(outputs={"qat_model": ctx.rel(d / "model")}, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# export


def _float(stage, ctx: RunContext, model, name: str, d: Path, example, keep_raw: bool = False) -> dict:
    from dsk_compress.compress.cnn import torch_predict
    from dsk_compress.export.cnn import export_module, ort_optimize
    from dsk_compress.export.onnx import fused_ops, op_histogram, ort_predict, simplify

    c = stage.config
    raw = export_module(model, example, d / f"{name}.raw.onnx", c.opset)
    simplify(raw)
    out = ort_optimize(raw, d / f"{name}.onnx", c.optimization)
    if not keep_raw:
        raw.unlink()
    ref = torch_predict(model.eval())(example)
    diff = float(np.abs(ort_predict(out)(example) - ref).max())
    if diff > c.parity_atol:
        raise ExportError(f"{name}: ONNX output differs from torch by {diff:.2e} (> parity_atol {c.parity_atol})",
                          hint="raise stages.N.parity_atol or report a bug")
    return {"path": ctx.rel(out), "precision": "fp32", "parity_max_abs_diff": diff, "fused_ops": fused_ops(op_histogram(out))}


def _ptq(stage, ctx: RunContext, d: Path, raw: Path, params: int, source: str) -> dict:
    """ORT dynamic and static INT8 quantization of every Conv and Linear of the float student: the baselines QAT must beat."""
    from dsk_compress.export.cnn import ort_optimize, quantize_dynamic_int8, quantize_static_int8
    from dsk_compress.export.onnx import fused_ops, op_histogram

    c = stage.config
    out = {}
    dyn = quantize_dynamic_int8(raw, d / "ptq-dynamic.raw.onnx")
    sta = quantize_static_int8(raw, d / "ptq-static.raw.onnx", ctx.task.calibration_batches(c.ptq_calibration_batches, 4))
    for name, q, how in (("ptq-dynamic", dyn, "ORT quantize_dynamic (ConvInteger / dynamic MatMul)"),
                         ("ptq-static", sta, "ORT quantize_static (QDQ, min/max calibration)")):
        final = ort_optimize(q, d / f"{name}.onnx", c.optimization)
        q.unlink()
        out[name] = {"path": ctx.rel(final), "role": name, "precision": "int8", "params": params,
                     "fused_ops": fused_ops(op_histogram(final)),
                     "integer_ops": {k: v for k, v in op_histogram(final).items() if k in _integer_op_names()},
                     "notes": f"{how} of {source}, per-channel 7-bit int8 weights, no fine-tune"}
    raw.unlink()
    return out


def _integer_op_names() -> set[str]:
    from dsk_compress.export.cnn import INTEGER_CONVS
    from dsk_compress.export.onnx import INTEGER_MATMULS

    return INTEGER_CONVS | INTEGER_MATMULS


def run_export(stage, ctx: RunContext) -> StageResult:
    """ONNX (dynamic batch) for the teacher, the float student(s) and baselines, ORT PTQ baselines and the QAT student in INT8 Q/DQ."""
    from dsk_compress.compress.cnn import torch_predict
    from dsk_compress.compress.qat import freeze_for_export, quant_layers, sqnr_db
    from dsk_compress.export.cnn import INTEGER_CONVS, export_int8_qdq, integer_ops, ort_optimize
    from dsk_compress.export.onnx import fused_ops, op_histogram, ort_predict
    from dsk_compress.models.source import count_params, load_model_dir
    from dsk_compress.runtimes.onnxruntime import make_session, session_predict

    c = stage.config
    unsupported = [p for p in c.precisions if p == "fp16"] + (["device"] if c.device else [])
    if unsupported:
        raise ExportError(f"export {' and '.join(unsupported)} is not supported for torch students yet",
                          hint="use precisions: [fp32, int8] and no device")
    d = ctx.stage_dir("export")
    example = ctx.task.example_inputs(2)
    artifacts: dict[str, dict] = {}
    teacher = ctx.teacher()
    artifacts["teacher"] = {**_float(stage, ctx, teacher, "teacher", d, example), "role": "teacher", "params": count_params(teacher),
                            "notes": f"{type(teacher).__name__} from {ctx.spec.teacher.torch}, fp32"}
    for bname, rel in ctx.outputs.get("prune", {}).get("baselines", {}).items():
        m = load_model_dir(ctx.path(rel))
        artifacts["pruned-oneshot"] = {**_float(stage, ctx, m, "pruned-oneshot", d, example), "role": "pruned-oneshot",
                                       "params": count_params(m), "stage": "prune", "model_dir": rel,
                                       "notes": "pruned to the same widths in one step, same total fine-tune budget, fp32"}
    qrel = ctx.latest_output("qat_model")
    qat_input = ctx.latest_output("model", before="qat")
    rel = ctx.outputs.get("prune", {}).get("model")
    name, m = ("student-prune", load_model_dir(ctx.path(rel))) if rel else ("student", _student(ctx, "export"))
    want_ptq = c.ptq_baselines and qrel is not None and rel == qat_input
    artifacts[name] = {**_float(stage, ctx, m, name, d, example, keep_raw=want_ptq), "role": "student", "params": count_params(m),
                       "stage": "prune" if rel else "input", "model_dir": rel,
                       "notes": "after prune, fp32" if rel else "the student as given, fp32"}
    if want_ptq:
        artifacts.update(_ptq(stage, ctx, d, d / f"{name}.raw.onnx", artifacts[name]["params"], name))
    metrics: dict = {"precisions": list(c.precisions), "device": None}
    if qrel is not None and "int8" in c.precisions:
        q = load_model_dir(ctx.path(qrel))
        freeze_for_export(q)
        xs = ctx.task.example_inputs(32)
        ref = torch_predict(q)(xs)
        qdq = d / "student-int8.qdq.onnx"
        info = export_int8_qdq(q, example, qdq, c.opset)
        out = ort_optimize(qdq, d / "student-int8.onnx", c.optimization)
        got = ort_predict(out)(xs)
        sqnr = sqnr_db(ref, got)
        qdq_sqnr = sqnr_db(ref, session_predict(make_session(qdq, optimization="disable"))(xs))
        hist = op_histogram(out)
        n_int, n_q = integer_ops(hist), len(quant_layers(q))
        n_conv = sum(1 for m_ in quant_layers(q) if type(m_).__name__ == "QuantConv2d")
        if sqnr < c.qdq_min_sqnr_db:
            raise ExportError(f"INT8 ONNX vs torch fake-quant SQNR {sqnr:.1f} dB is below {c.qdq_min_sqnr_db} dB")
        if n_int != n_q:
            raise ExportError(f"only {n_int} of {n_q} quantized layers became integer ops in ONNX Runtime ({fused_ops(hist)})")
        qi = json.loads((ctx.path(qrel) / "dsk_model.json").read_text()).get("qat", {})
        artifacts["final"] = {"path": ctx.rel(out), "role": "final", "precision": "int8", "params": count_params(q), "qdq_path": ctx.rel(qdq),
                              "activations": qi.get("activations"), "sqnr_db_vs_fake_quant": round(sqnr, 2),
                              "max_abs_diff_vs_fake_quant": float(np.abs(got - ref).max()), "qdq_graph_sqnr_db": round(qdq_sqnr, 2),
                              "integer_ops": n_int, "integer_convs": sum(v for k, v in hist.items() if k in INTEGER_CONVS),
                              "quantized_layers": n_q, "quantized_convs": n_conv, **info, "fused_ops": fused_ops(hist),
                              "notes": f"INT8 Q/DQ (BatchNorm folded, per-channel weights, per-tensor {qi.get('activations')} activations)"}
    elif qrel is not None:
        metrics["int8_skipped"] = "int8 is not in stages.N.precisions"
    if not want_ptq and c.ptq_baselines:
        metrics["ptq_skipped"] = "PTQ baselines quantize the float student QAT started from; this run has no qat stage"
    metrics["artifacts"] = artifacts
    return StageResult(outputs={"artifacts": artifacts}, metrics=metrics)
