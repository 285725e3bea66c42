"""Decode tokens/s of a finished run's KV-cache graphs: fp32 students vs the INT8 QAT student, ONNX Runtime CPU.

Greedy generation at batch 1: prefill the first half of the task's example window, then
``--new-tokens`` single-token steps feeding the KV cache back. Each model runs in its own worker
process, several interleaved rounds; medians and ratios go to JSON.

    python benchmarks/decode.py runs/quant-prune-distill-<time> --out benchmarks/results/decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dsk_compress.io import atomic_write_json
from dsk_compress.runtimes.decode import DEFAULT_NEW_TOKENS, benchmark_decode
from dsk_compress.tasks import build_task

PAIRS = {  # ratio = tokens/s of the second / tokens/s of the first
    "int8_vs_fp32_student": ("student-prune", "final"),
    "int8_vs_fp32_distilled": ("student-distill", "final"),
    "pruned_vs_unpruned_fp32": ("student-distill", "student-prune"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per round")
    ap.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    arts = json.loads((args.run_dir / "export" / "metrics.json").read_text())["artifacts"]
    kv = {n: args.run_dir / a["kv_cache_path"] for n, a in arts.items() if a.get("kv_cache_path")}
    if not kv:
        raise SystemExit(f"{args.run_dir} has no KV-cache artifacts (export with kv_cache: true)")
    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    task = build_task(dict(manifest["recipe"]["task"]))
    prompt = task.example_inputs(1)[0][: task.seq_len // 2]
    tok_s: dict[str, list[float]] = {n: [] for n in kv}
    last: dict[str, dict] = {}
    for _ in range(args.rounds):  # interleave so drift in machine load hits every model alike
        for name, path in kv.items():
            r = benchmark_decode(path, prompt, args.new_tokens, args.threads, repeats=args.repeats, warmup=1)
            tok_s[name].append(r["decode_tokens_per_s"])
            last[name] = r
    med = {n: statistics.median(v) for n, v in tok_s.items()}
    ratios = {k: round(med[b] / med[a], 3) for k, (a, b) in PAIRS.items() if a in med and b in med}
    out = {"version": 1, "run": str(args.run_dir), "batch_size": 1, "prompt_tokens": int(prompt.size), "new_tokens": args.new_tokens,
           "threads": args.threads, "rounds": args.rounds, "repeats_per_round": args.repeats,
           "decode_tokens_per_s_median": {k: round(v, 2) for k, v in med.items()}, "decode_tokens_per_s_rounds": tok_s,
           "prefill_ms_last_round": {n: r["prefill_ms"] for n, r in last.items()},
           "decode_ms_p50_last_round": {n: r["decode_ms_p50"] for n, r in last.items()},
           "precision": {n: arts[n].get("precision", "fp32") for n in kv}, "speedup": ratios}
    atomic_write_json(args.out, out)
    print(json.dumps({"decode_tokens_per_s_median": out["decode_tokens_per_s_median"], "speedup": ratios}, indent=2))


if __name__ == "__main__":
    main()
