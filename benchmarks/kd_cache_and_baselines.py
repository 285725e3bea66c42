"""Distillation on the default task at equal training tokens: expert-merged init vs random init vs
no KD, and cached top-k teacher logits vs the online teacher (accuracy and speed).

Runs the default recipe's distill and prune stages twice through ``run_recipe``:

- ``online``: the teacher runs in every KD step; distill also trains the ``nokd`` and
  ``random-init`` baselines on the same token budget;
- ``cached``: ``logit_cache.enabled`` (top-k fp16 logits written once, read by every later KD step).

Every accuracy is the validation sample's next-token accuracy of the trained torch model (validated
every ``steps / 5`` steps, so the curves show whether merge init starts and stays ahead); every time
is a trainer's measured wall clock on this host (validation included).

    python benchmarks/kd_cache_and_baselines.py --steps 250 --prune-steps 50
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from dsk_compress import run_recipe
from dsk_compress.io import atomic_write_json
from dsk_compress.recipes import load_recipe


def _run(args, tmp: Path, cached: bool) -> dict:
    baselines = "[]" if cached else "[nokd,random-init]"
    spec = load_recipe(
        args.recipe,
        [
            f"stages.0.steps={args.steps}",
            f"stages.0.baselines={baselines}",
            f"stages.1.steps={args.prune_steps}",
            f"stages.0.eval_every={max(1, args.steps // 5)}",
            f"logit_cache.enabled={str(cached).lower()}",
            f"logit_cache.top_k={args.top_k}",
        ],
    )
    spec = spec.model_copy(update={"stages": spec.stages[:2]})  # distill + prune
    rd = run_recipe(spec, out=tmp / ("cached" if cached else "online"))
    man = json.loads((rd / "manifest.json").read_text())
    dm, pm = man["stages"][0]["metrics"], man["stages"][1]["metrics"]

    def summary(m: dict) -> dict:
        t = m["train"]
        return {
            "accuracy": round(m["accuracy"], 3),
            "init_accuracy": round(m["init"]["accuracy"], 3) if "init" in m else None,
            "tokens": t["tokens"],
            "seconds": t["seconds"],
            "tokens_per_s": t["tokens_per_s"],
            "kd": t.get("kd"),
            "validation_curve": [[h["step"], round(h["accuracy"], 3)] for h in t["history"] if "accuracy" in h],
        }

    out = {
        "distill": summary(dm),
        "prune": {
            "accuracy": round(pm["accuracy"], 3),
            "accuracy_after_prune": pm["iterations"][-1]["accuracy_after_prune"],
            **{k: pm["iterations"][-1]["train"][k] for k in ("tokens", "seconds", "tokens_per_s", "kd")},
        },
    }
    for b in ("nokd", "random-init"):
        if f"baseline_{b}" in dm:
            out[f"distill_{b}"] = summary(dm[f"baseline_{b}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="quant-prune-distill")
    ap.add_argument("--steps", type=int, default=250, help="distill steps (each student, same batch size)")
    ap.add_argument("--prune-steps", type=int, default=50)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/kd_cache_and_baselines.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        online = _run(args, Path(tmp), cached=False)
        cached = _run(args, Path(tmp), cached=True)
    merge, rnd, nokd = online["distill"]["accuracy"], online["distill_random-init"]["accuracy"], online["distill_nokd"]["accuracy"]
    out = {
        "version": 1,
        "host": f"{platform.node()} {platform.machine()}",
        "threads": torch.get_num_threads(),
        "recipe": args.recipe,
        "distill_steps": args.steps,
        "prune_steps": args.prune_steps,
        "top_k": args.top_k,
        "online": online,
        "cached": cached,
        "ordering": {
            "kd_merge_init": merge,
            "kd_random_init": rnd,
            "no_kd": nokd,
            "merge_minus_random": round(merge - rnd, 3),
            "random_minus_nokd": round(rnd - nokd, 3),
            "merge_minus_nokd": round(merge - nokd, 3),
            "holds": merge > rnd > nokd,
        },
        "cache": {
            "distill_accuracy_delta": round(cached["distill"]["accuracy"] - merge, 3),
            "prune_accuracy_delta": round(cached["prune"]["accuracy"] - online["prune"]["accuracy"], 3),
            "build_speedup_vs_online": round(cached["distill"]["tokens_per_s"] / online["distill"]["tokens_per_s"], 3),
            "hit_speedup_vs_online": round(cached["prune"]["tokens_per_s"] / online["prune"]["tokens_per_s"], 3),
            "within_0_5_points": abs(cached["distill"]["accuracy"] - merge) <= 0.5
            and abs(cached["prune"]["accuracy"] - online["prune"]["accuracy"]) <= 0.5,
        },
    }
    atomic_write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("ordering", "cache")}, indent=2))


if __name__ == "__main__":
    main()
