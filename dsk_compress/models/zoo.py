"""Built-in zoo models: specs, training (`dsk-compress zoo train`) and loading of shipped weights."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsk_compress.errors import ModelSourceError
from dsk_compress.io import atomic_write_json, atomic_write_text, load_state_dict, save_state_dict
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


def load_zoo_model(name: str):
    """Load a shipped zoo model in float32 from its safetensors weights (no code is executed)."""
    import torch

    spec = ZOO.get(name)
    weights = zoo_path(name) / "model.safetensors"
    if not weights.is_file():
        raise ModelSourceError(
            f"zoo model {name!r} has no weights at {weights}",
            hint=f"train it with `dsk-compress zoo train {name}`",
        )
    model = build_model(spec)
    state = {k: v.to(torch.float32) for k, v in load_state_dict(weights).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
        raise ModelSourceError(f"zoo weights for {name!r} do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model


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


def train_zoo(
    name: str,
    work_dir: str | Path | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    resume: bool = True,
    install: bool = True,
    seed: int = 0,
) -> dict:
    """Train zoo model ``name`` on its task and (with ``install``) write its weights + card into the zoo.

    Training is resumable: checkpoints go to ``work_dir`` every 100 steps. Under ``torchrun`` it is
    data-parallel (``batch_size`` is the global batch); rank 0 alone scores the result and writes files,
    and every rank returns its card.
    """
    import torch

    from dsk_compress.compress import dist
    from dsk_compress.compress.trainer import TrainConfig, default_device, train
    from dsk_compress.tasks import build_task

    spec = ZOO.get(name)
    task = build_task({"name": spec.task})
    work = Path(work_dir or Path("runs") / f"zoo-{name}")
    device = dist.device(dist.init(), default_device())
    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    cfg = TrainConfig(
        steps=steps or spec.steps,
        batch_size=batch_size or spec.batch_size,
        lr=lr or spec.lr,
        warmup=spec.warmup,
        eval_every=max(1, (steps or spec.steps) // 6),
        ckpt_every=100,
        seed=seed,
    )
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

    t0 = time.time()
    result = train(model, loss_fn, task.train_batch, cfg, ckpt_dir=work / "checkpoint", resume=resume, evaluate=evaluate, desc=f"zoo train {name}")
    return dist.on_main(lambda: _finish_zoo(name, spec, task, model, cfg, result, device, t0, work, install), f"zoo train {name}: scoring")


def _finish_zoo(name: str, spec, task, model, cfg, result, device, t0: float, work: Path, install: bool) -> dict:
    """Score the fp16 weights that ship, and write them with their card (rank 0 alone under torchrun)."""
    import torch

    # score what ships: the fp16-rounded weights, reloaded in fp32
    state16 = {k: v.detach().to(torch.float16).cpu() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    model.load_state_dict({k: v.float() for k, v in state16.items()}, strict=False)
    metrics = task.evaluate(torch_predict(model)).as_dict()
    card = {
        "version": 1,
        "name": name,
        "description": spec.description,
        "architecture": type(model).__name__,
        "config": spec.config,
        "params": int(sum(p.numel() for p in model.parameters())),
        "task": task.describe(),
        "training": {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "seq_len": task.seq_len,
            "tokens": result.tokens,
            "lr": cfg.lr,
            "device": str(device),
            "world_size": result.world_size,
            "seconds": round(result.seconds, 1),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "history": result.history,
        },
        "validation": metrics,
        "stored_dtype": "float16",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        "wall_seconds_this_session": round(time.time() - t0, 1),
    }
    out_dir = zoo_path(name) if install else work / "final"
    save_state_dict(state16, out_dir / "model.safetensors")
    atomic_write_json(out_dir / "card.json", card)
    atomic_write_text(out_dir / "README.md", render_card_md(card))
    atomic_write_text(out_dir / "config.json", model.config.to_json_string())
    return card


def render_card_md(card: dict) -> str:
    """The human-readable model card (README.md beside the weights) from ``card.json``."""
    t, v = card["training"], card["validation"]
    lines = [
        f"# {card['name']}", "", card["description"], "",
        f"- Architecture: `{card['architecture']}`, {card['params']:,} parameters, stored as {card['stored_dtype']} safetensors",
        "- Config: " + ", ".join(f"{k}={val}" for k, val in card["config"].items() if val is not None),
        f"- Task: `{card['task']['name']}` on Python {card['task']['python']}'s standard library "
        f"({card['task']['train_bytes']:,} train bytes, {card['task']['val_bytes']:,} validation bytes), seq {t['seq_len']}",
        f"- Training: {t['steps']} steps x {t['batch_size']} sequences = {t['tokens']:,} tokens on {t['device']} "
        f"in {t['seconds'] / 60:.1f} min ({t['tokens_per_s']:,.0f} tokens/s), peak lr {t['lr']}, torch {t['torch']}",
        f"- Validation ({int(v['eval_tokens']):,} tokens, measured on the stored weights): **{v['accuracy']:.2f}%** next-byte accuracy, "
        f"**{v['bits_per_byte']:.3f}** bits/byte",
    ]
    b = card.get("baseline_student_alone")
    if b:
        lines.append(
            f"- The default recipe's student architecture (layers {b['layers']}, {b['params']:,} parameters) trained alone from random "
            f"init on the same data for {b['tokens']:,} tokens: {b['accuracy']:.2f}% ({b['bits_per_byte']:.3f} bits/byte); "
            f"the teacher is {b['accuracy_gap_points']:+.2f} points ahead"
        )
    lines += ["", "Reproduce: `dsk-compress zoo train " + card["name"] + f" --steps {t['steps']}`.", ""]
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
