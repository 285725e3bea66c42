"""Decode tokens/s of a finished run's student, side by side: our fused graphs, today's plain KV graph, onnxruntime-genai.

Variants, all greedy at batch 1 on ONNX Runtime CPU:

- ``fused-int8``: the QAT student (``qat/model``) as our fused int8 graph (export.fused): the final model;
- ``fused-fp32`` / ``fused-int4``: the float student (``prune/model``, else ``distill/model``) as fused fp32 / int4;
- ``plain-kv-int8`` / ``plain-kv-fp32``: the export stage's KV-cache graphs (export.kv_cache, ``kv_cache_path``
  in ``export/metrics.json``): today's decode path;
- ``genai-fp32`` / ``genai-int4``: onnxruntime-genai's model builder run on the same float student, decoded
  by onnxruntime-genai (``benchmarks/genai_decode.py`` in the venv given by ``--genai-python``; skipped with
  a message without it).

Every variant runs at every ``--threads`` count (intra-op threads; inter-op 1; genai's session gets the same
through its config overlay), each in its own worker process per round, rounds interleaved so drifting
machine load hits every variant alike; medians over rounds. A round of a variant = ``--repeats`` generations of
``--new-tokens`` after a ``--prompt-tokens`` prompt (the task's first example window). The JSON gives the ratios
both at equal thread counts (``ratios_at.<threads>``) and with every variant at its own fastest thread count
(``ratios``, the headline: what each stack delivers when tuned). Also: prefill p50 of a ``--prefill-tokens``
sequence (batch 1) for our fused and plain graphs, node counts as saved and as ONNX Runtime runs them, the
parity of each fused graph against torch and its accuracy on the task, and with ``--profile`` the operators
that take the decode (and prompt prefill) time (ORT's profiler, ``--profile-threads``) for fused-int8/fp32/int4
and genai's best build (``--profile-only`` adds that to an existing JSON). Everything is rebuilt from the run
directory into ``--work`` (default ``RUN_DIR/bench-decode``), so the JSON can be reproduced from the run alone:

    python benchmarks/decode.py runs/quant-prune-distill-<time> --genai-python /work/genai-venv/bin/python --profile
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dsk_compress.io import atomic_write_json
from dsk_compress.runtimes.decode import benchmark_decode
from dsk_compress.tasks import build_task

GENAI_SCRIPT = Path(__file__).with_name("genai_decode.py")
FINAL, PLAIN = "fused-int8", "plain-kv-int8"
COMPARED = ((FINAL, "fused-fp32"), ("fused-int4", "fused-fp32"), ("fused-fp32", "genai-fp32"), ("fused-int4", "genai-int4"),
            (FINAL, "fused-int4"), ("fused-int8-dynamic", FINAL), ("fused-int8-nbits", FINAL), (FINAL, "fused-int8-separate"))
"""Pairs (a, b) whose ratio ``a_vs_b`` the JSON gives besides the issue's two (where both were timed)."""


def _float_student(run: Path) -> Path:
    for stage in ("prune", "distill"):
        if (run / stage / "model" / "config.json").is_file():
            return run / stage / "model"
    raise SystemExit(f"{run} has no prune/model or distill/model: run the recipe first")


def _load_qat(path: Path):
    try:
        from dsk_compress.compress.qat import load_qat_model
    except ImportError:  # older trees keep it with the stages
        from dsk_compress.recipes.stages import load_qat_model
    from dsk_compress.compress.qat import freeze_for_export

    model = load_qat_model(path)
    freeze_for_export(model)
    return model


def build_ours(run: Path, work: Path, parity_prompt: np.ndarray, log, task, threads: int | None,
               int8_kernels: tuple[str, ...] = (), other_qat: dict[str, Path] | None = None) -> tuple[dict[str, Path], dict]:
    """Export the fused graphs and find (or export) the plain KV graphs; return their paths and, per fused graph, its
    parity against torch (the model it was exported from) and its accuracy on the task (scored through the graph itself,
    batch prefills). ``other_qat``: ``{label: QAT model dir}`` also exported as ``fused-int8-<label>``."""
    from transformers import AutoModelForCausalLM

    from dsk_compress.runtimes.decode import fused_predict

    from dsk_compress.export.fused import check_fused_parity, export_fused
    from dsk_compress.export.onnx import fused_ops, op_histogram

    paths, info = {}, {}
    fp = AutoModelForCausalLM.from_pretrained(_float_student(run), attn_implementation="eager").eval()
    for prec in ("fp32", "int4"):
        paths[f"fused-{prec}"] = export_fused(fp, work / f"student.fused-{prec}.onnx", prec)
    qat = run / "qat" / "model"
    q = _load_qat(qat) if (qat / "qat.json").is_file() else None
    if q is not None:
        paths[FINAL] = export_fused(q, work / "student.fused-int8.onnx", "int8")
        for kernel in int8_kernels:  # alternatives, not bit-compatible with QAT: activations quantized at run time
            paths[f"fused-int8-{kernel}"] = export_fused(q, work / f"student.fused-int8-{kernel}.onnx", "int8", int8_kernel=kernel)
    else:
        log(f"{run} has no qat/model: no fused-int8 variant")
    source = {name: q if name.startswith(FINAL) else fp for name in paths}
    for label, qdir in (other_qat or {}).items():  # e.g. a version-1 QAT model with a quantizer per Linear
        source[f"{FINAL}-{label}"] = _load_qat(qdir)
        paths[f"{FINAL}-{label}"] = export_fused(source[f"{FINAL}-{label}"], work / f"student.fused-int8-{label}.onnx", "int8")
    for name, path in paths.items():
        quant = name.startswith(FINAL)
        log(f"parity and task accuracy of {name} ({'torch fake quant' if quant else 'torch fp32'})")
        acc = task.evaluate(fused_predict(path, threads)).as_dict()
        info[name] = {**check_fused_parity(source[name], path, parity_prompt, 16), "fused_ops": fused_ops(op_histogram(path)),
                      "reference": "torch fake-quant QAT model" if quant else "torch fp32 student",
                      "accuracy": round(acc["accuracy"], 3), "bits_per_byte": round(acc["bits_per_byte"], 4)}
    arts = {}
    metrics = run / "export" / "metrics.json"
    if metrics.is_file():
        arts = json.loads(metrics.read_text()).get("artifacts", {})
    for name, art_name, model in (("plain-kv-int8", "final", q), ("plain-kv-fp32", fp_artifact(arts), fp)):
        rel = arts.get(art_name, {}).get("kv_cache_path") if art_name else None
        if rel and (run / rel).is_file():
            paths[name] = run / rel
        elif model is not None:  # the run exported without kv_cache: make today's graph here
            paths[name] = _export_plain(model, work / f"student.{name}.onnx", int8=name.endswith("int8"))
    if "plain-kv-int8" in paths:
        from dsk_compress.export.kv_cache import check_kv_parity

        info["plain-kv-int8"] = {**check_kv_parity(q, paths["plain-kv-int8"], parity_prompt, 16), "reference": "torch fake-quant QAT model"}
    return paths, info


def node_counts(path: Path) -> dict:
    """Nodes of an ONNX graph as saved and as ONNX Runtime runs it (after its EXTENDED load-time fusions), with the op histogram
    of the latter; ``path`` may be a model folder (onnxruntime-genai's, ``model.onnx``)."""
    import onnxruntime as ort

    from dsk_compress.export.onnx import op_histogram

    path = path / "model.onnx" if path.is_dir() else path
    with tempfile.TemporaryDirectory(prefix="dsk-nodes-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "m.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        hist = op_histogram(Path(tmp) / "m.onnx")
    return {"file": sum(op_histogram(path).values()), "at_load": sum(hist.values()), "ops_at_load": hist}


def fp_artifact(arts: dict) -> str | None:
    """The export artifact of the float student the fused graphs come from (student-prune, else student-distill)."""
    return next((n for n in ("student-prune", "student-distill") if n in arts), None)


def _export_plain(model, path: Path, int8: bool) -> Path:
    import warnings

    from dsk_compress.export.kv_cache import export_float_with_past, export_int8_qdq_with_past
    from dsk_compress.export.onnx import ort_optimize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of transformers' cache code
        if not int8:
            return export_float_with_past(model, path)
        qdq = path.with_name(path.stem + ".qdq.onnx")
        export_int8_qdq_with_past(model, qdq)
        return ort_optimize(qdq, path)


def byte_tokenizer_json(path: Path) -> None:
    """A byte-level tokenizer.json (id = byte value), what onnxruntime-genai's builder and loader expect beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's printable stand-ins for bytes, the alphabet of the ByteLevel pre-tokenizer
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    vocab = {chr(b) if b in printable else chr(next(extra)): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def build_genai(python: str, student: Path, work: Path, precisions: list[str], log) -> dict[str, Path]:
    """Run onnxruntime-genai's model builder on a copy of ``student`` (+ tokenizer.json, eos id) for each precision
    (the thread count is set per run, :func:`run_genai`)."""
    hf = work / "genai-hf"
    shutil.rmtree(hf, ignore_errors=True)
    shutil.copytree(student, hf)
    cfg = json.loads((hf / "config.json").read_text())
    for key in ("eos_token_id", "bos_token_id"):  # the builder needs them; min_length keeps eos from ending the timed decode
        if cfg.get(key) is None:
            cfg[key] = 0
    (hf / "config.json").write_text(json.dumps(cfg, indent=2))
    byte_tokenizer_json(hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    out = {}
    for prec in precisions:
        dst = work / f"genai-{prec}"
        shutil.rmtree(dst, ignore_errors=True)
        log(f"onnxruntime-genai builder: {prec}")
        cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(dst), "-p", prec, "-e", "cpu",
               "-c", str(work / "genai-cache")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"onnxruntime-genai builder failed for {prec}:\n{proc.stderr[-2000:]}")
        out[f"genai-{prec}"] = dst
    return out


def run_genai(python: str, model_dir: Path, prompt: np.ndarray, new_tokens: int, repeats: int, threads: int | None,
              profile: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="dsk-genai-") as tmp:
        p, out = Path(tmp) / "prompt.npy", Path(tmp) / "result.json"
        np.save(p, prompt)
        cmd = [python, str(GENAI_SCRIPT), "--model-dir", str(model_dir), "--prompt", str(p), "--new-tokens", str(new_tokens),
               "--repeats", str(repeats), "--warmup", "1", "--out", str(out)]
        if profile:
            cmd += ["--profile", profile]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"onnxruntime-genai decode of {model_dir} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def top_operators(trace: Path, new_tokens: int, top: int = 8) -> dict:
    """Time per operator type in an ORT profiler trace, for the decode steps and for the prompt prefills apart.

    The trace holds one ``model_run`` per ORT call, in order: per generation one prefill then ``new_tokens``
    steps. Node events are assigned to the run they fall in.
    """
    import bisect

    events = json.loads(trace.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [st for st, _ in runs]
    phases = {"decode": lambda k: k % (new_tokens + 1) != 0, "prefill": lambda k: k % (new_tokens + 1) == 0}
    per_op: dict[str, dict[str, float]] = {p: {} for p in phases}
    calls: dict[str, dict[str, int]] = {p: {} for p in phases}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        k = bisect.bisect_right(starts, e["ts"]) - 1
        if k < 0:
            continue
        phase = "decode" if phases["decode"](k) else "prefill"
        op = e["args"]["op_name"]
        per_op[phase][op] = per_op[phase].get(op, 0.0) + e["dur"]
        calls[phase][op] = calls[phase].get(op, 0) + 1
    out = {}
    for phase, keep in phases.items():
        idx = [k for k in range(len(runs)) if keep(k)]
        n = max(len(idx), 1)
        total = sum(per_op[phase].values()) or 1.0
        rows = sorted(per_op[phase].items(), key=lambda kv: -kv[1])[:top]
        out[phase] = {"runs": len(idx), "model_run_us": round(sum(runs[k][1] - runs[k][0] for k in idx) / n, 2),
                      "kernel_us": round(total / n, 2),
                      "operators": [{"op": op, "us": round(us / n, 2), "share": round(us / total, 3), "nodes": calls[phase][op] // n}
                                    for op, us in rows]}
    return out


def profile_ours(path: Path, prompt: np.ndarray, new_tokens: int, threads: int | None, prefix: Path) -> Path:
    import onnxruntime as ort

    from dsk_compress.runtimes.decode import measure_decode
    from dsk_compress.runtimes.decoder import FusedDecoderSession

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    measure_decode(None, prompt, new_tokens, threads, repeats=3, warmup=1, session=FusedDecoderSession(None, session=sess))
    return Path(sess.end_profiling())


def profile_all(paths: dict, genai: dict, genai_best: str | None, prompt: np.ndarray, args, work: Path, log) -> dict:
    """ORT-profiler top operators of fused-int8, fused-fp32, fused-int4 and genai's best build (3 generations after one
    warm-up, ``--profile-threads`` intra-op threads)."""
    log("profiling")
    t = args.profile_threads
    prof = {name: top_operators(profile_ours(paths[name], prompt, args.new_tokens, t, work / f"profile-{name}"), args.new_tokens)
            for name in (FINAL, "fused-fp32", "fused-int4") if name in paths}
    if genai_best in genai:
        for old in work.glob(f"profile-{genai_best}_*.json"):
            old.unlink()
        run_genai(args.genai_python, genai[genai_best], prompt, args.new_tokens, 3, t, profile=str(work / f"profile-{genai_best}"))
        prof[genai_best] = top_operators(max(work.glob(f"profile-{genai_best}_*.json")), args.new_tokens)
    return prof


def _median(xs: list[float], digits: int) -> float:
    return round(statistics.median(xs), digits)


def _ratios(med: dict[str, float], faster_is_higher: bool, pairs: dict[str, tuple[str, str | None]]) -> dict[str, float]:
    """``{key: a over b}`` for every pair both of whose medians exist (tokens/s: a / b; a time: b / a, so > 1 means a is faster)."""
    out = {}
    for key, (a, b) in pairs.items():
        if a in med and b in med:
            out[key] = round(med[a] / med[b] if faster_is_higher else med[b] / med[a], 3)
    return out


def summarize(tok_s: dict, step_p50: dict, prefill: dict, threads: list[int], genai: dict) -> dict:
    """Medians over rounds per variant and thread count, the thread count each variant is fastest at (by tokens/s) and
    the issue's ratios both at equal thread counts and with every variant at its best."""
    med = {n: {t: _median(v, 2) for t, v in per.items() if v} for n, per in tok_s.items()}
    p50 = {n: {t: _median(v, 4) for t, v in per.items() if v} for n, per in step_p50.items()}
    pre = {n: {t: _median(v, 3) for t, v in per.items() if v} for n, per in prefill.items()}
    best_t = {n: max(per, key=per.get) for n, per in med.items() if per}
    at = {"best": ({n: med[n][t] for n, t in best_t.items()}, {n: p50[n][t] for n, t in best_t.items()},
                   {n: min(pre[n].values()) for n in pre if pre[n]})}
    for t in threads:
        at[str(t)] = ({n: per[t] for n, per in med.items() if t in per}, {n: per[t] for n, per in p50.items() if t in per},
                      {n: per[t] for n, per in pre.items() if t in per})
    out = {"decode_tokens_per_s_median": {n: {str(t): v for t, v in per.items()} for n, per in med.items()},
           "decode_ms_p50_median": {n: {str(t): v for t, v in per.items()} for n, per in p50.items()},
           "prefill_ms_p50": {n: {str(t): v for t, v in per.items()} for n, per in pre.items()},
           "best_threads": {n: t for n, t in best_t.items()}, "ratios_at": {}}
    for key, (m, m50, mpre) in at.items():
        g_best = max((n for n in genai if n in m), key=lambda n: m[n], default=None)
        pairs = {"final_vs_onnxruntime_genai": (FINAL, g_best), "final_vs_plain_kv": (FINAL, PLAIN),
                 **{f"{a}_vs_{b}": (a, b) for a, b in COMPARED}}
        prefill_pairs = {"fused_int8_vs_fused_fp32": (FINAL, "fused-fp32"), "plain_int8_vs_plain_fp32": (PLAIN, "plain-kv-fp32")}
        out["ratios_at"][key] = {"genai_best": g_best, "tokens_per_s": _ratios(m, True, pairs), "step_p50": _ratios(m50, False, pairs),
                                 "prefill": _ratios(mpre, False, prefill_pairs)}
    best = out["ratios_at"]["best"]
    out.update(genai_best=best["genai_best"], ratios=best["tokens_per_s"], ratios_from_step_p50=best["step_p50"],
               prefill_speedup=best["prefill"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    ap.add_argument("--work", type=Path, default=None, help="where the graphs are built (default RUN_DIR/bench-decode)")
    ap.add_argument("--genai-python", default=None, help="python of a venv with onnxruntime-genai (0.18) and transformers 5.x")
    ap.add_argument("--genai-precisions", default="fp32,int4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per round")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts, each variant timed at each (comma-separated)")
    ap.add_argument("--profile", action="store_true", help="profile fused-int8/fp32/int4 and genai's best build (ORT's profiler)")
    ap.add_argument("--profile-threads", type=int, default=1)
    ap.add_argument("--note", default=None, help="free text stored in the JSON (e.g. that the machine was shared)")
    ap.add_argument("--profile-only", action="store_true",
                    help="no timing rounds: refresh parity, accuracy and the profile in the existing --out JSON")
    ap.add_argument("--int8-kernels", default="", help="also time int8 alternatives: dynamic and/or nbits (export.fused int8_kernel)")
    ap.add_argument("--other-qat", action="append", default=[], metavar="LABEL=DIR",
                    help="also time the fused int8 graph of another QAT model dir as fused-int8-LABEL (e.g. one trained with a "
                         "quantizer per Linear); repeatable")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]

    def log(msg: str) -> None:
        print(f"[decode-bench] {msg}", file=sys.stderr, flush=True)

    run = args.run_dir
    work = args.work or run / "bench-decode"
    work.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((run / "manifest.json").read_text())
    task = build_task(dict(manifest["recipe"]["task"]))
    window = np.asarray(task.example_inputs(1)[0], np.int64)
    if window.size < max(args.prompt_tokens, args.prefill_tokens):
        raise SystemExit(f"the task's example window has {window.size} tokens; lower --prompt-tokens / --prefill-tokens")
    prompt, long_prompt = window[: args.prompt_tokens], window[: args.prefill_tokens]

    other = {label: Path(d) for label, d in (a.split("=", 1) for a in args.other_qat)}
    paths, parity = build_ours(run, work, prompt, log, task, threads[0], tuple(k for k in args.int8_kernels.split(",") if k), other)
    genai_skipped = None
    if args.genai_python and Path(args.genai_python).is_file():
        genai = build_genai(args.genai_python, _float_student(run), work, args.genai_precisions.split(","), log)
    else:
        genai = {}
        genai_skipped = (f"--genai-python {args.genai_python!r} is not a file" if args.genai_python else "no --genai-python given") + \
            ": onnxruntime-genai reference skipped (make a venv with onnxruntime-genai==0.18.0, transformers 5.x, onnx_ir)"
        log(genai_skipped)
    nodes = {name: node_counts(path) for name, path in {**paths, **genai}.items()}

    if args.profile_only:
        out = json.loads(Path(args.out).read_text())
        out.update(parity=parity, nodes=nodes, profile_threads=args.profile_threads)
        out["profile"] = profile_all(paths, genai, out.get("genai_best"), prompt, args, work, log)
        atomic_write_json(args.out, out)
        print(json.dumps(out["profile"], indent=2))
        return

    variants = {**paths, **genai}
    load_start = round(os.getloadavg()[0], 2)  # 1-minute load average: how busy the machine was
    tok_s = {n: {t: [] for t in threads} for n in variants}
    step_p50 = {n: {t: [] for t in threads} for n in variants}
    prefill = {n: {t: [] for t in threads} for n in paths}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):  # interleaved: every variant at every thread count once per round
        log(f"round {r + 1}/{args.rounds}")
        for t in threads:
            for name, path in variants.items():
                if name in genai:
                    res = run_genai(args.genai_python, path, prompt, args.new_tokens, args.repeats, t)
                else:
                    res = benchmark_decode(path, prompt, args.new_tokens, t, repeats=args.repeats, warmup=1)
                    pre = benchmark_decode(path, long_prompt, 0, t, repeats=args.repeats, warmup=1)
                    prefill[name][t].append(pre["prefill_ms"])
                tok_s[name][t].append(res["decode_tokens_per_s"])
                step_p50[name][t].append(res["decode_ms_p50"])
                tokens[name] = res["tokens"]

    summary = summarize(tok_s, step_p50, prefill, threads, genai)
    same = {f"{a}=={b}": tokens[a] == tokens[b] for a, b in (("fused-fp32", "genai-fp32"), ("fused-fp32", "plain-kv-fp32"),
                                                             (FINAL, PLAIN)) if a in tokens and b in tokens}
    import onnxruntime

    out = {"version": 3, "run": str(run), "machine": f"{os.cpu_count()} CPUs", "note": args.note,
           "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
           "onnxruntime": onnxruntime.__version__, "batch_size": 1, "prompt_tokens": int(prompt.size), "new_tokens": args.new_tokens,
           "prefill_tokens": int(long_prompt.size), "threads": threads, "rounds": args.rounds, "repeats_per_round": args.repeats,
           "ratios_basis": "ratios / ratios_from_step_p50 / prefill_speedup: every variant at its fastest thread count (best_threads, "
                           "by tokens/s; prefill: its lowest p50); ratios_at.<threads>: all variants at that thread count",
           **summary, "nodes": nodes,
           "decode_tokens_per_s_rounds": {n: {str(t): v for t, v in per.items()} for n, per in tok_s.items()},
           "decode_ms_p50_rounds": {n: {str(t): v for t, v in per.items()} for n, per in step_p50.items()},
           "prefill_ms_rounds": {n: {str(t): v for t, v in per.items()} for n, per in prefill.items()},
           "genai_skipped": genai_skipped, "same_greedy_tokens": same, "parity": parity,
           "artifacts": {n: str(p) for n, p in variants.items()}}
    if args.profile:
        out["profile_threads"] = args.profile_threads
        out["profile"] = profile_all(paths, genai, out["genai_best"], prompt, args, work, log)
    atomic_write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("decode_tokens_per_s_median", "best_threads", "ratios", "ratios_from_step_p50", "prefill_ms_p50",
                                          "prefill_speedup", "same_greedy_tokens")}, indent=2))


if __name__ == "__main__":
    main()
