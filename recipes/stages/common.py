"""What the stages share: evaluation, KD fine-tuning with the run's teacher, the student a stage starts from,
rank helpers under torchrun, and how a recipe error names a stage's field.

Two kinds of student run through the same stages. A Hugging Face causal LM (the default; cut from the
teacher by distill) uses the helpers at the top. Your own torch model (``student: {torch: ...}`` with
``task: {torch: ...}``: any ``model(x) -> logits`` module, the task supplying ``(x, y)`` batches) uses the
``torch_*`` helpers at the bottom; prune, qat and export branch to it once, at the top of ``run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from dsk_compress.recipes.base import RunContext, StrictModel
from dsk_compress.recipes.limits import MAX_BATCH, MAX_STEPS


# the KD fine-tune settings the training stages (distill, prune, qat) share (no docstring: docs/recipes.md shows none)
class _TrainSettings(StrictModel):
    steps: int = Field(200, ge=0, le=MAX_STEPS, description="optimizer steps")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="sequences per step (the memory it needs is checked before the run)")
    lr: float = Field(1e-3, gt=0, le=1)
    warmup: int = Field(20, ge=0, le=MAX_STEPS)
    temperature: float = Field(2.0, gt=0, le=100, description="KD softmax temperature")
    kd_weight: float = Field(0.8, ge=0, le=1, description="weight of the KD term; the rest is hard-label CE")
    reverse_kl: float = Field(
        0.0, ge=0, le=100, description="weight of the reverse KL(student || teacher) inside the KD term (online teacher only)"
    )
    eval_every: int = Field(0, ge=0, le=MAX_STEPS, description="validate every N steps (0: only at the end)")
    early_stop_patience: int = Field(0, ge=0, le=MAX_STEPS, description="stop after N validations without improvement (needs eval_every)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="training precision: auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 autocast, fp16 autocast + gradient scaler (CUDA only)",
    )


# each stage reads its own slice of the training stream
DATA_OFFSETS = {"distill": 0, "prune": 1_000_000, "qat": 2_000_000}


def rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 alone under torchrun (every rank holds the same model and metrics; one writes them)."""
    from dsk_compress.compress import dist

    return fn(*args, **kwargs) if dist.is_main() else None


def agreed(value):
    """Rank 0's ``value`` on every rank: a resume decision that ranks must take the same way."""
    from dsk_compress.compress import dist

    return dist.broadcast_object(value)


def evaluate(ctx: RunContext, model) -> dict:
    """The task's metrics of a causal LM in torch (eval mode)."""
    from dsk_compress.models.zoo import torch_predict

    model.eval()
    return ctx.task.evaluate(torch_predict(model)).as_dict()


def train_cfg(c, data_offset: int, seed: int, steps: int | None = None):
    """The trainer's config from a stage config ``c`` (``steps`` overrides ``c.steps``)."""
    from dsk_compress.compress.trainer import TrainConfig

    return TrainConfig(
        steps=c.steps if steps is None else steps,
        batch_size=c.batch_size,
        lr=c.lr,
        warmup=min(c.warmup, max(0, (steps or c.steps) // 5)),
        eval_every=c.eval_every,
        ckpt_every=50,
        seed=seed,
        data_offset=data_offset,
        early_stop_patience=c.early_stop_patience,
        precision=c.precision,
    )


def stage_field(ctx: RunContext, stage: str, name: str) -> str:
    """``stages.<i>.<name>``: how a recipe error names a field of a stage."""
    i = next((i for i, s in enumerate(ctx.spec.stages) if s.stage == stage), None)
    return f"stages.{i}.{name}" if i is not None else name


def check_kd_settings(ctx: RunContext, c, stage: str) -> None:
    """KD settings that cannot work together, refused before any training."""
    from dsk_compress.errors import RecipeError

    cached = ctx.spec.logit_cache.enabled and c.kd_weight > 0
    if cached and c.reverse_kl > 0:
        raise RecipeError(
            f"{stage_field(ctx, stage, 'reverse_kl')} needs the full teacher distribution, but logit_cache is enabled",
            hint="set logit_cache.enabled: false or reverse_kl: 0",
        )
    if getattr(c, "hidden_mse", 0.0) > 0 and ctx.spec.logit_cache.enabled:
        raise RecipeError(
            f"{stage_field(ctx, stage, 'hidden_mse')} needs the online teacher's hidden states, but logit_cache is enabled",
            hint="set logit_cache.enabled: false or hidden_mse: 0",
        )


def kd_train(
    ctx: RunContext,
    model,
    c,
    stage: str,
    ckpt: Path,
    steps: int | None = None,
    data_offset: int = 0,
    params=None,
    hidden_pairs: list | None = None,
):
    """Train ``model`` with KD from the run's teacher; ``hidden_pairs`` are the (student, teacher) layers for ``c.hidden_mse``."""
    from dsk_compress.compress import dist
    from dsk_compress.compress.distill import HiddenStateMSE, make_kd_loss_fn
    from dsk_compress.compress.trainer import train

    check_kd_settings(ctx, c, stage)
    hidden_w = getattr(c, "hidden_mse", 0.0)
    cache = ctx.logit_cache() if c.kd_weight > 0 else None
    # with a logit cache every KD stage reads the same data stream, so later stages hit the cache
    offset = 0 if cache is not None else DATA_OFFSETS[stage] + data_offset
    cfg = train_cfg(c, offset, ctx.spec.seed, steps)
    if cfg.steps == 0:
        return None
    sharded = ctx.teacher_sharded()
    # with a logit cache and no hidden-state term the teacher runs only on a cache miss, and the cache loads it then
    # (a run that released it after distill does not load it again for a stage the cache already covers)
    teacher = None if cache is not None and hidden_w == 0 and not sharded else ctx.kd_teacher()
    filled = 0
    if teacher is None and cache is not None and not dist.env().enabled:
        filled = fill_logit_cache(ctx, cache, cfg, stage)  # the teacher's pass first, then released: never beside the student
    hidden = None
    if hidden_w > 0:
        hidden = HiddenStateMSE(hidden_pairs, model.config.hidden_size, teacher.config.hidden_size, seed=ctx.spec.seed)
    loss_fn = make_kd_loss_fn(
        teacher, c.temperature, c.kd_weight, cache=cache, reverse_kl=c.reverse_kl, hidden=hidden, hidden_weight=hidden_w
    )
    ev = (lambda m: evaluate(ctx, m)) if c.eval_every else None
    hits0, misses0 = (cache.hits, cache.misses) if cache else (0, 0)
    # student and online teacher train on the GPU when there is one (each rank's own under torchrun), with precision
    # auto -> bf16 autocast there, and come back to where they were (the CPU) for evaluation, saving and export
    from dsk_compress.compress.trainer import default_device

    dev = dist.device(dist.env(), default_device())
    s_home = next(model.parameters()).device
    t_home = next(teacher.parameters()).device if teacher is not None else None
    model.to(dev)
    if not sharded and teacher is not None:  # a sharded teacher already lives on the training devices
        teacher.to(dev)
    try:
        res = train(
            model, loss_fn, ctx.task.train_batch, cfg, ckpt_dir=ckpt, resume=ctx.resume, evaluate=ev, desc=stage, params=params, aux=hidden
        )
    finally:
        model.to(s_home)
        if not sharded and teacher is not None:
            teacher.to(t_home)
        if cache is not None and cache.teacher is not None and not sharded:
            cache.teacher.to(s_home)  # loaded on a miss and moved to the training device there
        if hidden is not None:
            hidden.to(s_home)
    res.kd = (
        {"teacher": "cached top-%d logits" % cache.k, "cache_hits": cache.hits - hits0, "cache_misses": cache.misses - misses0}
        | ({"cache_filled_before_training": filled} if filled else {})
        if cache
        else {"teacher": "online" if c.kd_weight > 0 or hidden is not None else "none"}
    )
    if sharded and (cache is not None or res.kd["teacher"] == "online"):
        res.kd["teacher_sharding"] = {
            "kind": "fsdp",
            "shards": dist.env().world_size,
            "params_on_rank0": dist.local_numel(teacher),
            "params": sum(p.numel() for p in teacher.parameters()),
        }
    if hidden is not None:
        res.kd.update(hidden_mse=hidden_w, hidden_pairs=[list(p) for p in hidden.pairs], final_hidden_mse=res.final_logs.get("hidden_mse"))
    return res


def fill_logit_cache(ctx: RunContext, cache, cfg, stage: str) -> int:
    """Compute the teacher's cached logits of every batch ``cfg`` will train on (the trainer's batch indices), then release
    the teacher: training reads them all from the cache. The peak is the larger of the teacher's pass and the student's
    training, not their sum (a 1.16B bf16 teacher is 2.2 GB beside a 375M student's 6 GB of weights, gradients and AdamW
    state). Batches already cached (a resumed run, a later stage) are skipped; nothing is loaded when all are. Returns how
    many batches the teacher computed."""
    from dsk_compress.compress.trainer import default_device
    from dsk_compress.progress import train_progress

    indices = range(cfg.data_offset, cfg.data_offset + cfg.steps * cfg.grad_accum)
    todo = [i for i in indices if not cache.cached(i)]
    if not todo:
        return 0
    import time

    dev = default_device()
    t0, tokens = time.perf_counter(), 0
    with train_progress(f"{stage}: teacher logits", total=len(todo)) as bar:
        for k, i in enumerate(todo):  # a miss loads the teacher (the cache's loader) and moves it to the batch's device
            x = ctx.task.train_batch(i, cfg.batch_size).to(dev)
            cache.get(i, x)
            tokens += int(x.numel())
            bar.update(k + 1, loss=None, tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
    ctx.release_teacher()
    return len(todo)


def train_summary(res) -> dict:
    """What ``metrics.json`` records of a fine-tune (``{"steps": 0}`` when there was none)."""
    if res is None:
        return {"steps": 0}
    return {
        "steps": res.steps,
        "tokens": res.tokens,
        "seconds": round(res.seconds, 1),
        "tokens_per_s": round(res.tokens_per_s, 1),
        "precision": res.precision,
        "world_size": res.world_size,
        "final_loss": round(res.final_loss, 4),
        "kd": getattr(res, "kd", None),
        "history": res.history,
    }


def student_model(ctx: RunContext, before: str):
    """The causal-LM student the stage ``before`` starts from: the latest earlier stage's model, else the recipe's student."""
    from dsk_compress.models.source import load_hf_dir, load_model_source

    rel = ctx.latest_output("model", before=before)
    if rel is not None:
        return load_hf_dir(ctx.path(rel))
    st = ctx.spec.student
    if st.from_teacher is not None:
        from dsk_compress.errors import RecipeError

        raise RecipeError(f"the {before!r} stage needs a student: add a 'distill' stage before it or give student: {{hf: DIR}}")
    return load_model_source(st.model_dump(exclude_none=True, exclude={"from_teacher"}))


# ---------------------------------------------------------------------------------------------
# your own torch model (student: {torch: ...}); the bench stage needs no branch (ONNX files and the task)


def is_torch_run(ctx: RunContext) -> bool:
    """The recipe's student is your own torch model (not a Hugging Face causal LM)."""
    return getattr(ctx.spec.student, "torch", None) is not None


def torch_student(ctx: RunContext, before: str):
    """Your torch student as the stage ``before`` starts from it: the latest earlier stage's model, else the factory's."""
    from dsk_compress.models.source import load_model_dir, load_model_source

    rel = ctx.latest_output("model", before=before)
    if rel is not None:
        return load_model_dir(ctx.path(rel))
    return load_model_source(ctx.spec.student.model_dump(exclude_none=True, exclude={"from_teacher"}))


def torch_evaluate(ctx: RunContext, model) -> dict:
    """The task's metrics of your torch model (eval mode)."""
    from dsk_compress.compress.cnn import torch_predict

    model.eval()
    return ctx.task.evaluate(torch_predict(model)).as_dict()


def torch_kd_train(ctx: RunContext, model, c, stage: str, ckpt: Path, steps: int | None = None, data_offset: int = 0):
    """Fine-tune ``model`` on the task's ``(x, y)`` batches with logit KD from the run's teacher (the one trainer)."""
    from dsk_compress.compress import dist
    from dsk_compress.compress.cnn import make_classifier_kd_loss
    from dsk_compress.compress.trainer import train

    cfg = train_cfg(c, DATA_OFFSETS[stage] + data_offset, ctx.spec.seed, steps)
    if cfg.steps == 0:
        return None
    teacher = ctx.teacher() if c.kd_weight > 0 else None
    loss_fn = make_classifier_kd_loss(teacher, c.temperature, c.kd_weight, hard_loss=getattr(ctx.task, "loss", None))
    ev = (lambda m: torch_evaluate(ctx, m)) if c.eval_every else None
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


def torch_train_summary(res) -> dict:
    """:func:`train_summary` in samples: the trainer counts batch elements as tokens; here they are samples."""
    out = train_summary(res)
    if res is not None:
        out["samples"] = out.pop("tokens")
        out["samples_per_s"] = out.pop("tokens_per_s")
    return out
