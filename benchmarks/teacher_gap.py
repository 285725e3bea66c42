"""Is the zoo teacher worth distilling from? Train the default recipe's student architecture alone.

Trains the dense student architecture of a recipe (random init, no teacher) on the teacher's own
task for the same number of tokens as the teacher's training, then writes the validation accuracy
of both to JSON and into the teacher's card (``baseline_student_alone``).

    python benchmarks/teacher_gap.py --recipe quant-prune-distill --out benchmarks/results/teacher_gap.json
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="quant-prune-distill")
    ap.add_argument("--out", default="benchmarks/results/teacher_gap.json")
    ap.add_argument("--tokens", type=int, default=None, help="token budget (default: the teacher's)")
    ap.add_argument("--work-dir", default="runs/teacher-gap")
    ap.add_argument("--update-card", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    spec = load_recipe(args.recipe)
    name = spec.teacher.zoo
    zspec = ZOO.get(name)
    card = zoo_card(name)
    if card is None and args.tokens is None:
        raise SystemExit(f"{name} has no card: train it first with `dsk-compress zoo train {name}` or give --tokens")
    task = build_task({"name": zspec.task})
    ft = spec.student.from_teacher
    teacher_shape = build_model(zspec)  # random weights: only the architecture is used
    student, _ = build_student(teacher_shape, layers=ft.layers, keep_every=ft.keep_every,
                               intermediate_size=ft.intermediate_size, ffn_init="random", seed=spec.seed)
    torch.manual_seed(spec.seed)
    for m in student.modules():  # re-initialise everything copied from the (random) teacher shape
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    student.apply(student._init_weights)
    tokens = args.tokens or card["training"]["tokens"]
    bs = zspec.batch_size
    steps = max(1, tokens // (bs * task.seq_len))
    cfg = TrainConfig(steps=steps, batch_size=bs, lr=zspec.lr, warmup=zspec.warmup, ckpt_every=100, seed=spec.seed)
    t0 = time.time()
    res = train(student, lambda m, x, s: (lm_loss(m(input_ids=x, use_cache=False).logits, x), {}), task.train_batch, cfg,
                ckpt_dir=Path(args.work_dir) / "checkpoint", desc="student alone")
    metrics = task.evaluate(torch_predict(student)).as_dict()
    out = {
        "version": 1,
        "teacher": {"name": name, "params": card["params"], "tokens": card["training"]["tokens"], **card["validation"]} if card else None,
        "student_alone": {"layers": select_layers(teacher_shape.config.num_hidden_layers, ft.layers, ft.keep_every),
                          "params": count_params(student), "tokens": res.tokens, "steps": steps,
                          "tokens_per_s": round(res.tokens_per_s, 1), "seconds": round(time.time() - t0, 1), **metrics},
    }
    out["accuracy_gap_points"] = round(out["teacher"]["accuracy"] - metrics["accuracy"], 3) if card else None
    atomic_write_json(args.out, out)
    if args.update_card and card:
        card["baseline_student_alone"] = {"recipe": args.recipe, **out["student_alone"], "accuracy_gap_points": out["accuracy_gap_points"]}
        atomic_write_json(zoo_path(name) / "card.json", card)
        atomic_write_text(zoo_path(name) / "README.md", render_card_md(card))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
