"""Distillation throughput (tokens/s) on this host: online teacher vs cached top-k logits vs no KD.

Builds the default recipe's student from the shipped teacher and times the same number of trainer
steps in each mode (the cached mode is timed on a warm cache, i.e. as prune / QAT fine-tunes see it).

    python benchmarks/distill_throughput.py --steps 20 --out benchmarks/results/distill_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from dsk_compress.compress.distill import make_kd_loss_fn
from dsk_compress.compress.logit_cache import TeacherLogitCache
from dsk_compress.compress.student import build_student
from dsk_compress.compress.trainer import TrainConfig, default_device, train
from dsk_compress.io import atomic_write_json
from dsk_compress.models.source import load_model_source
from dsk_compress.recipes import load_recipe
from dsk_compress.tasks import build_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="quant-prune-distill")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/distill_throughput.json")
    args = ap.parse_args()

    spec = load_recipe(args.recipe)
    dev = default_device()
    task = build_task(spec.task.model_dump())
    teacher = load_model_source(spec.teacher.model_dump(exclude_none=True)).to(dev)
    ft = spec.student.from_teacher
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherLogitCache(Path(tmp) / "cache", teacher, task.fingerprint(), args.top_k)
        modes = [
            ("online", make_kd_loss_fn(teacher, 2.0, 0.8)),
            ("cache-build", make_kd_loss_fn(teacher, 2.0, 0.8, cache=cache)),
            ("cache-hit", make_kd_loss_fn(teacher, 2.0, 0.8, cache=cache)),
            ("no-kd", make_kd_loss_fn(teacher, 2.0, 0.0)),
        ]
        for name, loss_fn in modes:
            student, _ = build_student(
                teacher,
                layers=ft.layers,
                keep_every=ft.keep_every,
                intermediate_size=ft.intermediate_size,
                ffn_init="top",
                calibration=task.calibration_batches(2),
            )
            student.to(dev)
            res = train(
                student,
                loss_fn,
                task.train_batch,
                TrainConfig(steps=args.steps, batch_size=args.batch_size, warmup=2),
                desc=f"distill {name}",
            )
            results[name] = {"tokens_per_s": round(res.tokens_per_s, 1), "seconds": round(res.seconds, 2), "tokens": res.tokens}
    out = {
        "version": 1,
        "device": str(dev),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": task.seq_len,
        "top_k": args.top_k,
        "modes": results,
        "cache_hit_speedup_vs_online": round(results["cache-hit"]["tokens_per_s"] / results["online"]["tokens_per_s"], 3),
    }
    atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
