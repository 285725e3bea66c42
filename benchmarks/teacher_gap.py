"""Is the zoo teacher worth distilling from? Train the default recipe's student architecture alone.

Trains the dense student architecture of a recipe (random init, no teacher) on the teacher's own
task at one or more token budgets (default: the recipe's distill budget, then 8,192,000 tokens),
scores each on the task's validation windows, and writes them with the teacher's accuracy (read
from its card) to JSON, and into the teacher's card (``baseline_student_alone``). The JSON is
rewritten after each budget, so a long run shows its first points early.

    OMP_NUM_THREADS=2 python benchmarks/teacher_gap.py --recipe quant-prune-distill --out benchmarks/results/teacher_gap.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dsk_compress.compress.student import build_student, select_layers
from dsk_compress.compress.trainer import TrainConfig, train
from dsk_compress.io import atomic_write_json, atomic_write_text
from dsk_compress.models.source import count_params
from dsk_compress.models.zoo import ZOO, build_model, lm_loss, render_card_md, torch_predict, zoo_card, zoo_path
from dsk_compress.recipes import load_recipe
from dsk_compress.tasks import build_task

REFERENCE_TOKENS = 8_192_000  # the budget of the earlier CPU teacher (2000 steps x 16 x 256): comparable with past results


def distill_tokens(spec, seq_len: int) -> int:
    """Tokens the recipe's distill stage trains its student on (steps x batch x seq_len)."""
    stage = next((s for s in spec.stages if s.stage == "distill"), None)
    if stage is None:
        raise SystemExit(f"recipe {spec.name!r} has no distill stage: give --tokens")
    return stage.steps * stage.batch_size * seq_len


def student_alone(spec, zspec, task, tokens: int, work_dir: Path) -> dict:
    """Train the recipe's student architecture from random init without a teacher for ``tokens`` tokens and score it."""
    ft = spec.student.from_teacher
    torch.manual_seed(spec.seed)
    teacher_shape = build_model(zspec)  # random weights: only the architecture is used
    student, _ = build_student(
        teacher_shape, layers=ft.layers, keep_every=ft.keep_every, intermediate_size=ft.intermediate_size, ffn_init="random", seed=spec.seed
    )
    torch.manual_seed(spec.seed)
    for m in student.modules():  # re-initialise everything copied from the (random) teacher shape
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    student.apply(student._init_weights)
    bs = zspec.batch_size
    steps = max(1, tokens // (bs * task.seq_len))
    cfg = TrainConfig(steps=steps, batch_size=bs, lr=zspec.lr, warmup=zspec.warmup, ckpt_every=100, seed=spec.seed)
    t0 = time.time()
    res = train(
        student,
        lambda m, x, s: (lm_loss(m(input_ids=x, use_cache=False).logits, x), {}),
        task.train_batch,
        cfg,
        ckpt_dir=work_dir / f"tokens-{tokens}" / "checkpoint",
        desc=f"student alone, {tokens:,} tokens",
    )
    metrics = task.evaluate(torch_predict(student)).as_dict()
    return {
        "layers": select_layers(teacher_shape.config.num_hidden_layers, ft.layers, ft.keep_every),
        "intermediate_size": student.config.intermediate_size,
        "params": count_params(student),
        "tokens": res.tokens,
        "steps": steps,
        "batch_size": bs,
        "lr": cfg.lr,
        # seconds and tokens/s of this process; a resumed run's tokens/s covers only the part trained here
        "tokens_per_s": round(res.tokens_per_s, 1),
        "seconds": round(time.time() - t0, 1),
        "resumed_from_step": res.resumed_from,
        **metrics,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="quant-prune-distill")
    ap.add_argument("--out", default="benchmarks/results/teacher_gap.json")
    ap.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help=f"token budgets, trained in this order (default: the recipe's distill budget, then {REFERENCE_TOKENS:,})",
    )
    ap.add_argument("--work-dir", default="runs/teacher-gap", help="checkpoints, one folder per budget (an interrupted run resumes)")
    ap.add_argument("--update-card", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    spec = load_recipe(args.recipe)
    name = spec.teacher.zoo
    zspec = ZOO.get(name)
    task = build_task({"name": zspec.task})
    recipe_tokens = distill_tokens(spec, task.seq_len)
    budgets = args.tokens or [recipe_tokens, REFERENCE_TOKENS]
    points = []
    for tokens in budgets:
        point = student_alone(spec, zspec, task, tokens, Path(args.work_dir))
        point["budget"] = "the recipe's distill budget" if tokens == recipe_tokens else "reference"
        points.append(point)
        # the card is read afresh at each write: the teacher may have been replaced while this ran
        card = zoo_card(name)
        teacher = {"name": name, "params": card["params"], "tokens": card["training"]["tokens"], **card["validation"]} if card else None
        for p in points:
            p["accuracy_gap_points"] = round(teacher["accuracy"] - p["accuracy"], 3) if teacher else None
        out = {
            "version": 2,
            "recipe": args.recipe,
            "recipe_distill_tokens": recipe_tokens,
            "teacher": teacher,
            "student_alone": points,
            "measured": {
                "host": f"{platform.node()} {platform.machine()}",
                "torch_threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d"),
                "note": "CPU fp32 training; seconds and tokens/s are wall-clock on a machine shared with other work",
            },
        }
        atomic_write_json(args.out, out)
        if args.update_card and card:
            card["baseline_student_alone"] = [{"recipe": args.recipe, **p} for p in points]
            atomic_write_json(zoo_path(name) / "card.json", card)
            atomic_write_text(zoo_path(name) / "README.md", render_card_md(card))
        print(json.dumps(out, indent=2), flush=True)


if __name__ == "__main__":
    main()
