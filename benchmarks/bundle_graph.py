"""The graph a CPU bundle ships: the fused decoder graph scored and timed as a full-sequence model, against the
full-sequence graph of the same variant, on this host.

A CPU-only device's bundle carries one copy of the weights, the fused decoder graph, and its ``run.py`` scores and times
that graph on whole windows from an empty cache (``runtimes.decoder.FusedFullSequence``). This measures what that
changes, per variant of a finished run with both graphs: accuracy on the run's validation windows (the bench stage's
arithmetic) and p50 at batch 1 over interleaved rounds, both graphs in one process.

    python benchmarks/bundle_graph.py runs/quant-prune-distill-<time> --out benchmarks/results/bundle_graph.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from dsk_compress.export.bundle import _eval_batch_size
from dsk_compress.io import atomic_write_json
from dsk_compress.report import load_report
from dsk_compress.runtimes import measure
from dsk_compress.runtimes.decoder import FusedFullSequence
from dsk_compress.runtimes.onnxruntime import make_session, session_predict
from dsk_compress.tasks import build_task


def _p50_ms(predict, x, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        predict(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", default="benchmarks/results/bundle_graph.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    report = load_report(a.run_dir)
    manifest = json.loads((a.run_dir / "manifest.json").read_text())
    export = next(s for s in manifest["stages"] if s["stage"] == "export")["outputs"]["artifacts"]
    task = build_task(manifest["recipe"]["task"])
    windows = task.eval_windows().astype(np.int64)
    batch = _eval_batch_size(task)  # the batch run.py scores in
    out = {
        "version": 1,
        "run": a.run_dir.name,
        "machine": f"{platform.node()} {platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "threads": a.threads,
        "rounds": a.rounds,
        "runs_per_round": a.runs,
        "variants": {},
    }
    for row in report["variants"]:
        art = export.get(row["name"]) or {}
        if " [" in row["name"] or not art.get("fused_path") or not str(row.get("artifact") or "").endswith(".onnx"):
            continue
        graphs = {
            "full": session_predict(make_session(a.run_dir / row["artifact"], threads=a.threads)),
            "fused": FusedFullSequence(make_session(a.run_dir / art["fused_path"], threads=a.threads)),
        }
        res = {}
        for kind, predict in graphs.items():
            correct, nll, count = measure.score_windows(predict, windows, batch, task.logits_dtype)
            res[kind] = {"accuracy": measure.lm_metrics(task.describe()["name"], correct, nll, count)["accuracy"], "p50_ms_rounds": []}
            for _ in range(3):
                predict(windows[:1])  # warm-up
        for _ in range(a.rounds):  # interleaved: both graphs see the same machine state
            for kind, predict in graphs.items():
                res[kind]["p50_ms_rounds"].append(round(_p50_ms(predict, windows[:1], a.runs), 3))
        for kind in res:
            res[kind]["p50_ms"] = statistics.median(res[kind]["p50_ms_rounds"])
        res["fused_over_full_p50"] = round(res["fused"]["p50_ms"] / res["full"]["p50_ms"], 3)
        res["accuracy_delta"] = round(res["fused"]["accuracy"] - res["full"]["accuracy"], 4)
        out["variants"][row["name"]] = res
        print(row["name"], json.dumps({k: res[k] for k in ("fused_over_full_p50", "accuracy_delta")}))
    atomic_write_json(Path(a.out), out)


if __name__ == "__main__":
    main()
