"""The one training loop shared by `zoo train`, distillation, pruning fine-tunes and QAT.

AdamW with linear warm-up and cosine decay, gradient clipping and accumulation, mixed precision
(``precision``: bf16 autocast, or fp16 autocast with a gradient scaler on CUDA), periodic
validation, and checkpoints with exact resume: the data stream is a pure function of the step
index, and model, auxiliary modules (e.g. KD projections), optimizer, scheduler, gradient scaler
and RNG states are saved together. Under ``torchrun`` the same loop runs data-parallel (see
``dsk_compress.compress.dist``): each rank takes a disjoint slice of every global batch, gradients
are averaged, and only rank 0 writes checkpoints and progress.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsk_compress.compress import dist
from dsk_compress.io import atomic_path, atomic_write_json, commit, load_state_dict, read_json, save_state_dict

# (model, batch, index of the batch in the data stream) -> (loss, logs)
LossFn = Callable[[torch.nn.Module, Any, int], "tuple[torch.Tensor, dict[str, float]]"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimisation settings; ``steps`` counts optimizer updates, ``batch_size`` is the global batch."""

    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 0
    ckpt_every: int = 100
    seed: int = 0
    data_offset: int = 0  # shifts the data stream so stages do not see the same batches
    early_stop_patience: int = 0  # stop after this many validations without a better accuracy (0: never)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA only, with a GradScaler)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    stopped_early: bool = False
    final_logs: dict[str, float] = field(default_factory=dict)  # the loss function's logs on the last batch
    precision: str = "fp32"
    world_size: int = 1
    skipped_steps: int = 0  # fp16 steps the gradient scaler skipped (inf/nan gradients)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """``(autocast dtype or None, use a gradient scaler, resolved name)`` for ``precision`` on ``device``."""
    from dsk_compress.errors import InvalidArgument

    if precision not in PRECISIONS:
        raise InvalidArgument(
            f"precision {precision!r} is not one of {', '.join(PRECISIONS)}", "precision", hint="use auto, fp32, bf16 or fp16"
        )
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None, False, "fp32"
    if precision == "bf16":
        return torch.bfloat16, False, "bf16"
    if device.type != "cuda":
        raise InvalidArgument(
            f"precision fp16 needs a CUDA device (training runs on {device.type})", "precision", hint="use bf16 or fp32 on CPU"
        )
    return torch.float16, True, "fp16"


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / max(1, cfg.warmup)
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _save_checkpoint(
    ckpt_dir: Path,
    model: torch.nn.Module,
    opt,
    sched,
    step: int,
    history: list,
    tokens: int,
    seconds: float,
    stopped: bool = False,
    scaler=None,
    aux: torch.nn.Module | None = None,
    skipped: int = 0,
) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), ckpt_dir / "model.safetensors")
    if aux is not None:
        save_state_dict(aux.state_dict(), ckpt_dir / "aux.safetensors")
    tmp, final = atomic_path(ckpt_dir / "optim.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    blob = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng,
        "scaler": scaler.state_dict() if scaler is not None else {},
    }
    torch.save(blob, tmp)
    commit(tmp, final)
    # state.json is written last: its presence means the checkpoint is complete
    atomic_write_json(
        ckpt_dir / "state.json",
        {"step": step, "history": history, "tokens": tokens, "seconds": seconds, "stopped": stopped, "skipped_steps": skipped},
    )


def remove_checkpoints(root: str | Path) -> int:
    """Delete every training checkpoint under ``root`` (a folder holding ``state.json`` and ``optim.pt``: model copy,
    AdamW state, RNG) once its stage is done and its final model saved; returns the bytes freed. A finished stage is
    never resumed from its checkpoint (``--rerun-from`` trains it again from the start), and the AdamW state alone is
    twice the student's fp32 weights."""
    import shutil

    freed = 0
    for state in sorted(Path(root).rglob("state.json")) if Path(root).is_dir() else []:
        d = state.parent
        if not (d / "optim.pt").is_file():
            continue
        freed += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        shutil.rmtree(d, ignore_errors=True)
    return freed


def _load_checkpoint(
    ckpt_dir: Path, model: torch.nn.Module, opt, sched, scaler=None, aux: torch.nn.Module | None = None
) -> tuple[int, list, int, float, bool, int]:
    from dsk_compress.errors import RunError

    state = read_json(ckpt_dir / "state.json")
    fix = f"delete {ckpt_dir} to restart the stage from its beginning"
    try:
        step, history, tokens, seconds = int(state["step"]), list(state["history"]), int(state["tokens"]), float(state["seconds"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"checkpoint {ckpt_dir / 'state.json'} is damaged ({type(e).__name__}: {e})", hint=fix) from None
    try:
        model.load_state_dict(load_state_dict(ckpt_dir / "model.safetensors"))
    except RuntimeError as e:
        raise RunError(
            f"checkpoint {ckpt_dir / 'model.safetensors'} does not fit the model: {str(e).splitlines()[0][:160]}", hint=fix
        ) from None
    if aux is not None:
        if not (ckpt_dir / "aux.safetensors").is_file():
            raise RunError(
                f"{ckpt_dir} has no aux.safetensors for the trainable loss modules (e.g. hidden-state projections)",
                hint="delete that checkpoint directory to restart the stage",
            )
        aux.load_state_dict(load_state_dict(ckpt_dir / "aux.safetensors"))
    try:
        # weights_only: a pickle that would run code is refused (UnpicklingError), never executed
        blob = torch.load(ckpt_dir / "optim.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        rng = blob["rng"]["torch"]
    except Exception as e:  # truncated zip, refused pickle, missing keys, shapes that do not fit: all one answer
        raise RunError(
            f"checkpoint {ckpt_dir / 'optim.pt'} is damaged or not one this trainer wrote "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
            hint=fix,
        ) from None
    if scaler is not None and scaler.is_enabled():
        if not blob.get("scaler"):
            raise RunError(
                f"{ckpt_dir / 'optim.pt'} has no gradient-scaler state but this run trains in fp16",
                hint="resume with the precision the checkpoint was made with, or delete the checkpoint",
            )
        scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(rng)
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return step, history, tokens, seconds, bool(state.get("stopped", False)), int(state.get("skipped_steps", 0))


@contextlib.contextmanager
def _no_progress():
    class _Null:
        def update(self, *a, **k) -> None:
            pass

    yield _Null()


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch_fn: Callable[[int, int], torch.Tensor],
    cfg: TrainConfig,
    ckpt_dir: str | Path | None = None,
    resume: bool = True,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    desc: str = "train",
    params: list | None = None,
    aux: torch.nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps.

    Args:
        loss_fn: ``(model, batch, index) -> (loss, logs)``; ``index`` is the batch's position in the data stream.
            Under torchrun ``model`` is the DistributedDataParallel wrapper: call it, do not read its attributes.
        batch_fn: ``(step, batch_size) -> batch``; deterministic in ``step`` for exact resume.
        ckpt_dir: where checkpoints go; with ``resume`` an existing complete checkpoint is loaded.
        evaluate: called every ``cfg.eval_every`` steps and at the end; its dict joins the history.
        params: parameters to optimise (default: all that require grad).
        aux: trainable modules the loss uses besides the model (e.g. hidden-state projections): optimised
            (without weight decay) and checkpointed beside the model, never saved into it.
    """
    from dsk_compress.progress import train_progress

    denv = dist.init()
    dist.shard_size(cfg.batch_size, denv)  # refuse a global batch that does not split evenly, before any work
    home = next(model.parameters()).device
    device = dist.device(denv, home)
    if device != home:  # a multi-GPU job: each rank trains on its own GPU
        model.to(device)
    if aux is not None:
        aux.to(device)
    autocast_dtype, use_scaler, precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    aux_params = [p for p in aux.parameters() if p.requires_grad] if aux is not None else []
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        # aux modules start at a meaningful value (an identity projection): weight decay would pull them off it
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay + aux_params, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start, history, tokens, seconds, stopped, skipped = 0, [], 0, 0.0, False, 0
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    # rank 0 decides whether to resume, so ranks cannot disagree; every rank then loads the same checkpoint
    # (multi-node jobs need the run directory on a shared filesystem: a rank that cannot see it fails here)
    if dist.broadcast_object(ckpt is not None and resume and (ckpt / "state.json").is_file()):
        start, history, tokens, seconds, stopped, skipped = _load_checkpoint(ckpt, model, opt, sched, scaler, aux)
        # the optimizer restored the learning rate of the saved schedule; a resume with another cfg.steps continues
        # on the new schedule from this step (for an unchanged cfg this recomputes the same value)
        for group, f, base in zip(opt.param_groups, sched.lr_lambdas, sched.base_lrs):
            group["lr"] = base * f(start)
    dist.barrier()
    resumed_from = start
    net: torch.nn.Module = model
    if denv.enabled:
        from torch.nn.parallel import DistributedDataParallel

        from dsk_compress.compress.moe import uses_sparse_grads

        # an MoE's experts that no token of a rank's batch was routed to get no gradient there
        sparse = uses_sparse_grads(model)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=sparse)
    all_params = params + aux_params
    model.train()
    loss_val = float("nan")
    logs: dict[str, float] = {}
    t0 = time.perf_counter() - seconds
    progress = train_progress(desc, total=cfg.steps, completed=start) if denv.is_main else _no_progress()
    try:
        with progress as prog:
            for step in range(start, cfg.steps if not stopped else start):
                opt.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    index = cfg.data_offset + step * cfg.grad_accum + micro
                    batch = batch_fn(index, cfg.batch_size)
                    tokens += int(batch.numel()) if hasattr(batch, "numel") else cfg.batch_size
                    batch = dist.shard(batch, denv)
                    batch = _to_device(batch, device)
                    # gradients are averaged across ranks once, on the last micro-batch
                    sync = net.no_sync() if denv.enabled and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                    with sync:
                        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                            loss, logs = loss_fn(net, batch, index)
                        scaler.scale(loss / cfg.grad_accum).backward()
                    step_loss += loss.detach().float() / cfg.grad_accum
                if denv.enabled:
                    for p in aux_params:  # aux modules live outside the DDP wrapper
                        if p.grad is not None:
                            dist.all_reduce_mean_(p.grad)
                    dist.all_reduce_mean_(step_loss)
                if not use_scaler and not math.isfinite(float(step_loss)):  # fp16's scaler skips such steps itself
                    from dsk_compress.errors import TrainingError

                    raise TrainingError(
                        f"{desc}: the loss became {float(step_loss)} at step {step + 1} of {cfg.steps}; nothing of "
                        "this step was applied or saved",
                        hint="lower lr or temperature, or check the teacher and the data (a NaN in its weights or logits)",
                    )
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)  # clip the true gradients; a no-op without a scaler
                    torch.nn.utils.clip_grad_norm_(all_params, cfg.grad_clip)
                if use_scaler:
                    scale = scaler.get_scale()
                    scaler.step(opt)  # skips the update when a gradient is inf / nan
                    scaler.update()
                    skipped += int(scaler.get_scale() < scale)
                else:
                    opt.step()
                sched.step()
                loss_val = float(step_loss)
                elapsed = time.perf_counter() - t0
                done = step + 1
                entry: dict[str, float] = {}
                if evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    if denv.is_main:  # rank 0 validates; every rank gets its result so early stopping agrees
                        model.eval()
                        entry = {"step": done, "tokens": tokens, "loss": loss_val, **evaluate(model)}
                        model.train()
                    entry = dist.broadcast_object(entry)
                    history.append(entry)
                    stopped = _plateaued(history, cfg.early_stop_patience)
                prog.update(done, loss=loss_val, tokens_per_s=tokens / max(elapsed, 1e-9), extra=entry)
                if ckpt is not None and (done % cfg.ckpt_every == 0 or done == cfg.steps or stopped):
                    if denv.is_main:
                        _save_checkpoint(ckpt, model, opt, sched, done, history, tokens, elapsed, stopped, scaler, aux, skipped)
                    dist.barrier()  # no rank runs ahead of (or reads) a half-written checkpoint
                if stopped:
                    start = done
                    break
    finally:
        del net  # drops DDP's gradient hooks; the next train() call wraps the model afresh
        if device != home:
            model.to(home)
            if aux is not None:
                aux.to(home)
    if denv.enabled and logs:  # the last batch's logs averaged over ranks, as one process would have logged them
        keys = sorted(logs)
        vals = dist.all_reduce_mean_(torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=device))
        logs = dict(zip(keys, vals.tolist()))
    model.eval()
    elapsed = time.perf_counter() - t0
    return TrainResult(
        steps=start if stopped else cfg.steps,
        tokens=tokens,
        seconds=elapsed,
        tokens_per_s=tokens / max(elapsed, 1e-9),
        final_loss=loss_val,
        history=history,
        resumed_from=resumed_from,
        stopped_early=stopped,
        final_logs=dict(logs),
        precision=precision,
        world_size=denv.world_size,
        skipped_steps=skipped,
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    """A tensor batch, or a tuple / list / dict of tensors (e.g. ``(inputs, labels)``), moved to ``device``."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def _plateaued(history: list[dict], patience: int) -> bool:
    """True when the last ``patience`` validations did not beat the best accuracy before them."""
    accs = [h["accuracy"] for h in history if "accuracy" in h]
    if patience <= 0 or len(accs) <= patience:
        return False
    return max(accs[-patience:]) <= max(accs[:-patience])


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
