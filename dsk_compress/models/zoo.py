"""Built-in zoo models: specs, training (`dsk-compress zoo train`) and loading of shipped weights."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsk_compress.errors import ModelSourceError
from dsk_compress.io import atomic_write_json, atomic_write_text, save_state_dict
from dsk_compress.registry import Registry

ZOO_DIR = Path(__file__).parent / "zoo"


@dataclass(frozen=True)
class ZooSpec:
    """A zoo model: a Hugging Face config, the task it is trained on and its training defaults."""

    name: str
    description: str
    model_type: str
    config: dict
    task: str = "code-lm"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    aux_loss_coef: float = 0.01
    extra: dict = field(default_factory=dict)


ZOO: Registry[ZooSpec] = Registry("zoo model")

ZOO.register("code-lm-moe")(
    ZooSpec(
        name="code-lm-moe",
        description="Mixtral-style MoE byte-level code LM (8 experts, top-2, 6 layers, 11.6M params)",
        model_type="mixtral",
        config=dict(
            vocab_size=256,
            hidden_size=192,
            intermediate_size=384,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=6,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=1024,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            router_aux_loss_coef=0.01,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        ),
    )
)


def build_config(spec: ZooSpec):
    from transformers import AutoConfig

    return AutoConfig.for_model(spec.model_type, **spec.config)


def build_model(spec: ZooSpec):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(build_config(spec), attn_implementation="eager")


def zoo_path(name: str) -> Path:
    return ZOO_DIR / name


def load_zoo_model(name: str, dtype: str = "fp32"):
    """Load a shipped zoo model in ``dtype`` (float32 unless asked; ``auto`` is fp32 for its fp16 weights) from its
    safetensors weights (no code is executed).

    The weights go through transformers' own ``from_pretrained`` with the spec's config, so a checkpoint
    saved by transformers 4 (per-expert keys) loads into transformers 5's fused experts by its conversion.
    """
    from dsk_compress.models.hf import load_hf_dir

    spec = ZOO.get(name)
    weights = zoo_path(name) / "model.safetensors"
    if not weights.is_file():
        raise ModelSourceError(
            f"zoo model {name!r} has no weights at {weights}",
            hint=f"train it with `dsk-compress zoo train {name}`",
        )
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt"):
            pass
    except Exception as e:  # a truncated or foreign file: say so before transformers does, in one line
        raise ModelSourceError(
            f"corrupt checkpoint {weights}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}",
            hint=f"re-create it with `dsk-compress zoo train {name}`",
        ) from None
    try:
        return load_hf_dir(zoo_path(name), config=build_config(spec), dtype=dtype)
    except ModelSourceError as e:
        raise ModelSourceError(
            f"zoo weights for {name!r} do not match its config: {e.message}", hint=f"retrain it with `dsk-compress zoo train {name}`"
        ) from None


def zoo_card(name: str) -> dict | None:
    p = zoo_path(name) / "card.json"
    return json.loads(p.read_text()) if p.is_file() else None


def lm_loss(logits, x):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def torch_predict(model, device=None):
    """A task ``predict`` function for a torch causal LM (numpy in, numpy logits out)."""
    import torch

    dev = device or next(model.parameters()).device

    @torch.no_grad()
    def predict(x):
        out = model(input_ids=torch.as_tensor(x, device=dev), use_cache=False)
        return out.logits.float().cpu().numpy()

    return predict


DEFAULT_CKPT_EVERY = 500  # ~1.5 min of an H200 at batch 64 (a checkpoint of code-lm-moe is ~140 MB), ~14 min of 2 CPU cores at batch 16


def train_zoo(
    name: str,
    work_dir: str | Path | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    resume: bool = True,
    install: bool = True,
    seed: int = 0,
    ckpt_every: int = DEFAULT_CKPT_EVERY,
    stdlib_root: str | Path | None = None,
    threads: int | None = None,
    force: bool = False,
) -> dict:
    """Train zoo model ``name`` on its task and (with ``install``) write its weights + card into the zoo.

    Training is resumable: checkpoints go to ``work_dir`` every ``ckpt_every`` steps. A resume may give a
    new total ``steps`` (not fewer than the checkpoint's): the cosine schedule then runs over the new
    total, continuing from the checkpoint's step, and the card records each leg of the schedule. Under
    ``torchrun`` it is data-parallel (``batch_size`` is the global batch); rank 0 alone scores the result
    and writes files, and every rank returns its card.

    Args:
        stdlib_root: the standard-library folder the ``code-lm`` task reads (default: this interpreter's),
            e.g. a copy of another machine's ``lib/python3.11`` so that a host with another Python trains
            on the same corpus (the card's ``task.corpus_fingerprint`` shows it).
        threads: torch CPU threads (``--threads``; default ``OMP_NUM_THREADS``, else the physical cores, see
            :mod:`dsk_compress.threads`); printed, recorded in the card's ``training.threads``, set back on return.
        force: with ``install``, replace weights already in the zoo (the shipped teacher, say); the replaced files
            are copied to ``work_dir/replaced-<time>/`` first.

    Raises:
        RunError: ``install`` over weights already in the zoo without ``force`` (before any training); resuming
            with fewer ``steps`` than the checkpoint has done, or with another peak ``lr``.
    """
    import torch

    from dsk_compress.compress import dist
    from dsk_compress.compress.trainer import TrainConfig, default_device, train
    from dsk_compress.tasks import build_task
    from dsk_compress.threads import choose_threads, threads_in_effect

    choice = choose_threads(threads)
    spec = ZOO.get(name)
    work = Path(work_dir or Path("runs") / f"zoo-{name}")
    total = steps or spec.steps
    cfg = TrainConfig(
        steps=total,
        batch_size=batch_size or spec.batch_size,
        lr=lr or spec.lr,
        warmup=spec.warmup,
        eval_every=max(1, total // 6),
        ckpt_every=ckpt_every,
        seed=seed,
    )
    legs = _schedule_legs(work, cfg, resume, lr_given=lr is not None)  # refuses a resume it cannot honour, before any work
    if install and not force and (zoo_path(name) / "model.safetensors").is_file():  # the shipped teacher is never lost silently
        from dsk_compress.errors import RunError

        raise RunError(
            f"installing would replace the weights in {zoo_path(name)}",
            hint=f"add --no-install to write them into {work / 'final'}, or --force to replace them "
            f"(the current ones are then copied to {work}/replaced-<time>/)",
        )
    task = build_task({"name": spec.task, **({"stdlib_root": str(stdlib_root)} if stdlib_root else {})})
    device = dist.device(dist.init(), default_device())
    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    if dist.is_main():
        atomic_write_json(work / "schedule.json", {"version": 1, "legs": legs})
    from dsk_compress.compress.moe import is_moe as _is_moe

    is_moe = _is_moe(model) and hasattr(model.config, "output_router_logits")  # families that return an aux loss

    def loss_fn(m, x, step):
        out = m(input_ids=x, use_cache=False, output_router_logits=is_moe)
        loss = lm_loss(out.logits, x)
        logs = {"ce": float(loss.detach())}
        if is_moe and getattr(out, "aux_loss", None) is not None:
            loss = loss + spec.aux_loss_coef * out.aux_loss
        return loss, logs

    small = _SubsetTask(task, 32)

    def evaluate(m):
        return small.evaluate(torch_predict(m)).as_dict()

    with threads_in_effect(choice):
        if dist.is_main():  # on stdout: stderr holds progress and errors
            print(choice.describe(), flush=True)
        t0 = time.time()
        result = train(
            model, loss_fn, task.train_batch, cfg, ckpt_dir=work / "checkpoint", resume=resume, evaluate=evaluate, desc=f"zoo train {name}"
        )
        return dist.on_main(
            lambda: _finish_zoo(name, spec, task, model, cfg, result, device, t0, work, install, legs, choice.as_dict()),
            f"zoo train {name}: scoring",
        )


def _schedule_legs(work: Path, cfg, resume: bool, lr_given: bool) -> list[dict]:
    """The legs of the learning-rate schedule so far (``start`` step, cosine ``steps``, ``batch_size``, ``lr``), this run's last.

    Each resume under a new total ``steps`` starts a leg at the checkpoint's step. Legs recorded past the
    checkpoint (a run that stopped before its next checkpoint) are dropped: training restarts from it.
    """
    from dsk_compress.errors import RunError
    from dsk_compress.io import read_json

    state = work / "checkpoint" / "state.json"
    leg = {"start": 0, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr}
    if not (resume and state.is_file()):
        return [leg]
    at = int(read_json(state)["step"])
    if cfg.steps < at:
        raise RunError(
            f"the checkpoint in {work / 'checkpoint'} is at step {at}; --steps {cfg.steps} cannot resume it",
            hint=f"give --steps {at} or more (the cosine schedule then runs over the new total from step {at}), "
            "or --no-resume to start over",
        )
    sched = work / "schedule.json"
    # a checkpoint written before schedule.json existed: its first leg's total is unknown
    legs = read_json(sched)["legs"] if sched.is_file() else [{"start": 0, "steps": None, "batch_size": None, "lr": None}]
    legs = [g for g in legs if g["start"] < at]
    last = legs[-1]
    if last["lr"] is not None and cfg.lr != last["lr"]:
        given = "--lr" if lr_given else "the model's default lr"
        raise RunError(
            f"the checkpoint in {work / 'checkpoint'} was trained at peak lr {last['lr']}, {given} is {cfg.lr}: "
            "a resume keeps the checkpoint's peak lr",
            hint=f"resume with --lr {last['lr']}, or --no-resume to start over",
        )
    if last["steps"] != cfg.steps or last["batch_size"] != cfg.batch_size:
        legs.append({**leg, "start": at})
    return legs


def _schedule_card(legs: list[dict], final_step: int) -> list[dict]:
    """The card's view of the schedule legs: which steps ran under which cosine total."""
    out = []
    for i, g in enumerate(legs):
        last = legs[i + 1]["start"] if i + 1 < len(legs) else final_step
        entry = {"first_step": g["start"] + 1, "last_step": last, "cosine_steps": g["steps"], "batch_size": g["batch_size"]}
        if g["start"]:
            entry["resumed_from_step"] = g["start"]
        out.append(entry)
    return out


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _finish_zoo(
    name: str, spec, task, model, cfg, result, device, t0: float, work: Path, install: bool, legs: list[dict], threads: dict | None = None
) -> dict:
    """Score the fp16 weights that ship, and write them with their card (rank 0 alone under torchrun)."""
    import platform

    import torch
    import transformers

    # score what ships: the fp16-rounded weights, reloaded in fp32
    state16 = {k: v.detach().to(torch.float16).cpu() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    model.load_state_dict({k: v.float() for k, v in state16.items()}, strict=False)
    metrics = task.evaluate(torch_predict(model)).as_dict()
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    card = {
        "version": 1,
        "name": name,
        "description": spec.description,
        "architecture": type(model).__name__,
        "config": spec.config,
        "params": int(sum(p.numel() for p in model.parameters())),
        "task": task.describe(),  # the corpus: its Python version, folder and fingerprint
        "training": {
            "steps": result.steps,
            "batch_size": cfg.batch_size,
            "seq_len": task.seq_len,
            "tokens": result.tokens,
            "lr": cfg.lr,
            "warmup": cfg.warmup,
            "schedule": _schedule_card(legs, result.steps),
            "ckpt_every": cfg.ckpt_every,
            "device": str(device),
            "device_name": _device_name(device),
            "precision": result.precision,
            "world_size": result.world_size,
            "threads": threads,  # torch CPU threads per process, and where the count came from
            "seconds": round(result.seconds, 1),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),  # the trainer's interpreter; task.python is the corpus's
            "history": result.history,
        },
        "validation": metrics,
        "scored": {
            "host": platform.node(),
            "device": str(next(model.parameters()).device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": now,
        },
        "stored_dtype": "float16",
        "finished": now,
        "wall_seconds_this_session": round(time.time() - t0, 1),
    }
    out_dir = zoo_path(name) if install else work / "final"
    if install and (out_dir / "model.safetensors").is_file():  # --force: keep what it replaces
        import shutil

        shutil.copytree(out_dir, work / time.strftime("replaced-%Y%m%d-%H%M%S"))
    save_state_dict(state16, out_dir / "model.safetensors")
    atomic_write_json(out_dir / "card.json", card)
    atomic_write_text(out_dir / "README.md", render_card_md(card))
    atomic_write_text(out_dir / "config.json", model.config.to_json_string())
    return card


def render_card_md(card: dict) -> str:
    """The human-readable model card (README.md beside the weights) from ``card.json``."""
    t, v, task = card["training"], card["validation"], card["task"]
    where = t.get("device_name") or t["device"]
    if t.get("precision") and t["precision"] != "fp32":
        where += f" ({t['precision']} autocast)"
    corpus = f"`{task['name']}` on the Python {task['python'] or '(version unknown)'} standard library"
    if task.get("stdlib_root"):
        corpus += f" at `{task['stdlib_root']}`"
    if task.get("corpus_fingerprint"):
        corpus += f", corpus fingerprint `{task['corpus_fingerprint']}`"
    trainer = ", ".join(f"{k} {t[k]}" for k in ("torch", "transformers", "python") if t.get(k))
    if t.get("commit"):
        trainer += f", project commit {t['commit']}"
    lines = [
        f"# {card['name']}",
        "",
        card["description"],
        "",
        f"- Architecture: `{card['architecture']}`, {card['params']:,} parameters, stored as {card['stored_dtype']} safetensors",
        "- Config: " + ", ".join(f"{k}={val}" for k, val in card["config"].items() if val is not None),
        f"- Task: {corpus} ({task['train_bytes']:,} train bytes, {task['val_bytes']:,} validation bytes), seq {t['seq_len']}",
        f"- Training: {t['steps']} steps x {t['batch_size']} sequences = {t['tokens']:,} tokens on {where} "
        f"in {t['seconds'] / 60:.1f} min ({t['tokens_per_s']:,.0f} tokens/s), peak lr {t['lr']}"
        + (f", warm-up {t['warmup']}" if t.get("warmup") else "")
        + (f", checkpoints every {t['ckpt_every']} steps" if t.get("ckpt_every") else "")
        + f"; {trainer}",
    ]
    schedule = t.get("schedule") or []
    if len(schedule) > 1:
        lines.append(
            "- Schedule (cosine, restarted on resume): "
            + "; ".join(
                f"steps {g['first_step']}-{g['last_step']} under a {g['cosine_steps'] or '?'}-step schedule"
                + (f" (resumed from the step-{g['resumed_from_step']} checkpoint)" if g.get("resumed_from_step") else "")
                for g in schedule
            )
        )
    scored = card.get("scored") or {}
    at = f" on {scored['host']} ({scored['device']}, torch {scored['torch']}, {scored['date'][:10]})" if scored else ""
    lines.append(
        f"- Validation ({int(v['eval_tokens']):,} tokens, measured on the stored weights{at}): **{v['accuracy']:.2f}%** "
        f"next-byte accuracy, **{v['bits_per_byte']:.3f}** bits/byte"
    )
    baselines = card.get("baseline_student_alone") or []
    for b in [baselines] if isinstance(baselines, dict) else baselines:  # one point (older cards) or one per token budget
        lines.append(
            f"- The default recipe's student architecture (layers {b['layers']}, {b['params']:,} parameters) trained alone from random "
            f"init on the same data for {b['tokens']:,} tokens: {b['accuracy']:.2f}% ({b['bits_per_byte']:.3f} bits/byte); "
            f"the teacher is {b['accuracy_gap_points']:+.2f} points ahead"
        )
    for note in card.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "Reproduce:", ""]
    legs = schedule or [{"cosine_steps": t["steps"], "last_step": t["steps"]}]
    for i, g in enumerate(legs):
        cmd = f"dsk-compress zoo train {card['name']} --steps {g['cosine_steps'] or g['last_step']} --batch-size {t['batch_size']}" + (
            f" --ckpt-every {t['ckpt_every']}" if t.get("ckpt_every") else ""
        )
        stop = f"  # stopped after the step-{g['last_step']} checkpoint, then resumed:" if i + 1 < len(legs) else ""
        lines.append(f"    {cmd}{stop}")
    if task.get("corpus_fingerprint"):
        which = f"the Python {task['python']} standard library" if task.get("python") else "that standard library"
        lines += [
            "",
            f"On a host with another Python, add `--stdlib-root DIR` with a copy of {which}: "
            f"the card's `task.corpus_fingerprint` must read `{task['corpus_fingerprint']}`.",
        ]
    lines.append("")
    return "\n".join(lines)


class _SubsetTask:
    """The first ``n`` validation windows of a task: a cheap progress signal during training."""

    def __init__(self, task, n: int) -> None:
        self.task = task
        self.n = n

    def evaluate(self, predict):
        saved = self.task._eval_starts
        self.task._eval_starts = saved[:: max(1, len(saved) // self.n)][: self.n]
        try:
            return self.task.evaluate(predict)
        finally:
            self.task._eval_starts = saved
