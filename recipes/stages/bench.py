"""The bench stage: measure every exported artifact on this host, then write the report.

Story: for each artifact the export stage left, score it with the task *in its runtime* (ONNX Runtime, or
eager torch for a teacher that did not export), so the accuracy reported is the accuracy of what ships;
time it (warm-up, timed runs, p50/p90/p99, throughput, peak memory; ``runtimes/``) in a fresh process;
time greedy decoding with its KV-cache graph when it has one; then hand the rows to
:func:`dsk_compress.report.build_report` (``report.json`` / ``.md`` / ``.html``).
"""

from __future__ import annotations

import platform

from dsk_compress.recipes.base import STAGES, RunContext, Stage, StageResult
from dsk_compress.recipes.schema import BenchStageConfig


@STAGES.register("bench")
class BenchStage(Stage[BenchStageConfig]):
    """Measure every exported variant: accuracy of the artifact in its runtime, latency, size, memory."""

    ranks = "main"  # under torchrun: rank 0 alone, the other ranks wait for its result

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.devices import load_device
        from dsk_compress.export.onnx import file_size, ort_predict
        from dsk_compress.models.zoo import torch_predict
        from dsk_compress.report import build_report
        from dsk_compress.runtimes import BenchConfig
        from dsk_compress.runtimes.onnxruntime import benchmark_onnx

        c = self.config
        device = load_device(c.device)
        threads = c.threads or device.threads
        artifacts = ctx.latest_output("artifacts") or {}
        inputs = ctx.task.example_inputs(c.batch_size)
        bcfg = BenchConfig(warmup=c.warmup, runs=c.runs, batch_size=c.batch_size, threads=threads)
        variants = []
        for name, art in artifacts.items():
            if art.get("path"):
                path = ctx.path(art["path"])
                acc = ctx.task.evaluate(ort_predict(path, threads)).as_dict()
                bench = benchmark_onnx(path, inputs, bcfg)
                size = file_size(path)
                runtime = "onnxruntime-cpu"
            else:  # torch fallback (e.g. a teacher that does not export)
                from dsk_compress.models.source import load_hf_dir
                from dsk_compress.runtimes.torch import benchmark_torch

                mdir = ctx.path(art["model_dir"])
                acc = ctx.task.evaluate(torch_predict(load_hf_dir(mdir))).as_dict()
                bench = benchmark_torch(mdir, inputs, bcfg)
                size = sum(f.stat().st_size for f in mdir.glob("*.safetensors"))
                runtime = "torch-eager-cpu"
            b = bench.as_dict()
            variants.append({
                "name": name, "role": art["role"], "stage": art.get("stage", name), "params": art["params"], "size_bytes": int(size),
                "accuracy": round(acc["accuracy"], 3),
                "bits_per_byte": round(acc["bits_per_byte"], 4) if "bits_per_byte" in acc else None,
                "metrics": {k: round(v, 4) for k, v in acc.items()},
                "latency_ms": {k: round(b[k], 3) for k in ("p50", "p90", "p99", "mean")},
                "throughput": round(b["throughput"], 2), "peak_memory_mb": b.get("peak_memory_mb"),
                "runtime": runtime, "device": device.name, "precision": art.get("precision", "fp32"),
                "artifact": art.get("path"), "notes": art.get("notes", ""),
            })
            variants[-1].update(self._decode(ctx, art, threads))
        td = ctx.task.describe()
        if getattr(ctx.task, "seq_len", None) is not None:
            task_str, shape_str = f"{td['name']} (seq {td['seq_len']}, {td.get('eval_tokens', '?')} validation tokens)", f"seq {ctx.task.seq_len}"
        else:  # your own task: no sequence length
            shape_str = "input " + "x".join(str(n) for n in tuple(inputs.shape)[1:])
            task_str = f"{td['name']} ({td.get('eval_samples', '?')} validation samples, {shape_str})"
        meta = {"run": ctx.run_dir.name, "recipe": ctx.spec.name, "task": task_str,
                "host": f"{device.name}: {platform.node()} {platform.machine()}, {threads} threads, batch {c.batch_size}, {shape_str}",
                "max_accuracy_drop": ctx.spec.report.max_accuracy_drop}
        from dsk_compress.sanity import chance_accuracy, flag_teacher_rows

        flag_teacher_rows(variants, chance_accuracy(ctx.task))  # a teacher near chance or below a student is flagged in its row
        report = build_report(ctx.run_dir, variants, meta)
        return StageResult(outputs={"report": "report.json"}, metrics={"variants": variants, "summary": report.get("summary")})

    def _decode(self, ctx: RunContext, art: dict, threads: int | None) -> dict:
        """Greedy decode with the artifact's KV-cache graph (none: nothing): prefill the first half of the task's
        example window, then ``DEFAULT_NEW_TOKENS`` single-token steps, in a fresh ONNX Runtime process."""
        if not art.get("kv_cache_path"):
            return {}
        from dsk_compress.runtimes.decode import DEFAULT_NEW_TOKENS, benchmark_decode

        c = self.config
        prompt = ctx.task.example_inputs(1)[0][: max(1, ctx.task.seq_len // 2)]
        r = benchmark_decode(ctx.path(art["kv_cache_path"]), prompt, DEFAULT_NEW_TOKENS, threads, repeats=max(3, min(c.runs, 10)),
                             warmup=max(1, min(c.warmup, 2)))
        keep = ("prompt_tokens", "new_tokens", "repeats", "prefill_ms", "decode_ms_p50", "decode_ms_p90", "decode_tokens_per_s", "peak_memory_mb")
        return {"decode_tokens_per_s": r["decode_tokens_per_s"], "decode": {"artifact": art["kv_cache_path"], **{k: r[k] for k in keep if k in r}}}
