"""The one training loop shared by `zoo train`, distillation, pruning fine-tunes and QAT.

AdamW with linear warm-up and cosine decay, gradient clipping and accumulation, bf16 autocast on
CUDA, periodic validation, and checkpoints with exact resume: the data stream is a pure function
of the step index, and model, optimizer, scheduler and RNG states are saved together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsk_compress.io import atomic_path, atomic_write_json, commit, load_state_dict, read_json, save_state_dict

# (model, batch, index of the batch in the data stream) -> (loss, logs)
LossFn = Callable[[torch.nn.Module, Any, int], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainConfig:
    """Optimisation settings; ``steps`` counts optimizer updates."""

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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / max(1, cfg.warmup)
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _save_checkpoint(ckpt_dir: Path, model: torch.nn.Module, opt, sched, step: int, history: list, tokens: int, seconds: float,
                     stopped: bool = False) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), ckpt_dir / "model.safetensors")
    tmp, final = atomic_path(ckpt_dir / "optim.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng}, tmp)
    commit(tmp, final)
    # state.json is written last: its presence means the checkpoint is complete
    atomic_write_json(ckpt_dir / "state.json", {"step": step, "history": history, "tokens": tokens, "seconds": seconds, "stopped": stopped})


def _load_checkpoint(ckpt_dir: Path, model: torch.nn.Module, opt, sched) -> tuple[int, list, int, float, bool]:
    state = read_json(ckpt_dir / "state.json")
    model.load_state_dict(load_state_dict(ckpt_dir / "model.safetensors"))
    blob = torch.load(ckpt_dir / "optim.pt", weights_only=True, map_location="cpu")
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return int(state["step"]), list(state["history"]), int(state["tokens"]), float(state["seconds"]), bool(state.get("stopped", False))


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
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps.

    Args:
        loss_fn: ``(model, batch, index) -> (loss, logs)``; ``index`` is the batch's position in the data stream.
        batch_fn: ``(step, batch_size) -> batch``; deterministic in ``step`` for exact resume.
        ckpt_dir: where checkpoints go; with ``resume`` an existing complete checkpoint is loaded.
        evaluate: called every ``cfg.eval_every`` steps and at the end; its dict joins the history.
        params: parameters to optimise (default: all that require grad).
    """
    from dsk_compress.progress import train_progress

    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, history, tokens, seconds, stopped = 0, [], 0, 0.0, False
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    if ckpt is not None and resume and (ckpt / "state.json").is_file():
        start, history, tokens, seconds, stopped = _load_checkpoint(ckpt, model, opt, sched)
    resumed_from = start
    use_amp = device.type == "cuda"
    model.train()
    loss_val = float("nan")
    t0 = time.perf_counter() - seconds
    with train_progress(desc, total=cfg.steps, completed=start) as prog:
        for step in range(start, cfg.steps if not stopped else start):
            opt.zero_grad(set_to_none=True)
            logs: dict[str, float] = {}
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                index = cfg.data_offset + step * cfg.grad_accum + micro
                batch = batch_fn(index, cfg.batch_size)
                batch = batch.to(device) if hasattr(batch, "to") else batch
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, logs = loss_fn(model, batch, index)
                (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
                tokens += int(batch.numel()) if hasattr(batch, "numel") else cfg.batch_size
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            loss_val = step_loss
            elapsed = time.perf_counter() - t0
            done = step + 1
            entry: dict[str, float] = {}
            if evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                model.eval()
                entry = {"step": done, "tokens": tokens, "loss": loss_val, **evaluate(model)}
                model.train()
                history.append(entry)
                stopped = _plateaued(history, cfg.early_stop_patience)
            prog.update(done, loss=loss_val, tokens_per_s=tokens / max(elapsed, 1e-9), extra=entry)
            if ckpt is not None and (done % cfg.ckpt_every == 0 or done == cfg.steps or stopped):
                _save_checkpoint(ckpt, model, opt, sched, done, history, tokens, elapsed, stopped)
            if stopped:
                start = done
                break
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
    )


def _plateaued(history: list[dict], patience: int) -> bool:
    """True when the last ``patience`` validations did not beat the best accuracy before them."""
    accs = [h["accuracy"] for h in history if "accuracy" in h]
    if patience <= 0 or len(accs) <= patience:
        return False
    return max(accs[-patience:]) <= max(accs[:-patience])


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
