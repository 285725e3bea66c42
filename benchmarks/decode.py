"""Decode tokens/s of a finished run's student, side by side and like for like: our fused graphs, today's plain KV graph,
onnxruntime-genai's builder output, and our graphs inside onnxruntime-genai's own generation loop.

Variants, all greedy at batch 1 on ONNX Runtime CPU:

- ``fused-int8``: the QAT student (``qat/model``) as our fused int8 graph (export.fused): the final model;
- ``fused-fp32`` / ``fused-int4``: the float student (``prune/model``, else ``distill/model``) as fused fp32 / int4 (PTQ);
- ``final-int4``: an int4 QAT student's fused graph where the run's export stage has one (an artifact of role ``final*``
  and precision int4), or ``--graph final-int4=PATH``; ``--graph LABEL=PATH`` adds any fused graph;
- ``plain-kv-int8`` / ``plain-kv-fp32``: the export stage's KV-cache graphs (export.kv_cache, ``kv_cache_path``
  in ``export/metrics.json``): today's decode path;
- ``genai-fp32`` / ``genai-int4``: onnxruntime-genai's model builder run on the same float student, decoded
  by onnxruntime-genai (``benchmarks/genai_decode.py`` in the Python given by ``--genai-python``);
- ``<ours>@genai`` (e.g. ``fused-int8@genai``): our fused graphs as ``dsk-compress export --format genai`` folders
  (export.genai: the same graph with an attention mask), decoded by the same onnxruntime-genai loop as its builder's
  output, so ``fused-int4@genai_vs_genai-int4`` compares the graphs alone, in one loop.

Like for like: every variant runs at every ``--threads`` count (intra-op threads; inter-op 1; genai's session gets the same
through its config overlay) and every ratio compares two variants at the same thread count (``ratios_at.<threads>``), by
tokens/s and by step p50; nothing compares one stack's best thread count with another's. Each measurement is a fresh
worker process; rounds are interleaved (every variant at every thread count once per round, the order rotated each
round) so drifting machine load hits every variant alike; medians over rounds. The 1-minute load average is recorded at
the start and end and before every round: the figures mean something only on an otherwise quiet machine. A round of a
variant = ``--repeats`` generations of ``--new-tokens`` after a ``--prompt-tokens`` prompt (the task's first example
window). Also: prefill p50 of a ``--prefill-tokens`` sequence (batch 1) for our own-loop graphs, node counts as saved and
as ONNX Runtime runs them, the parity of each fused graph against torch and its accuracy on the task, and with
``--profile`` the operators that take the decode (and prompt prefill) time (ORT's profiler, ``--profile-threads``) for
fused-int8/fp32/int4 and genai's best build (``--profile-only`` adds that to an existing JSON). ``--resummarize`` rebuilds
the medians and ratios of an existing ``--out`` from the per-round figures it stores (no timing). Everything is rebuilt
from the run directory into ``--work`` (default ``RUN_DIR/bench-decode``), so the JSON can be reproduced from the run alone:

    python benchmarks/decode.py runs/quant-prune-distill-<time> --genai-python /work/genai-venv/bin/python --profile

``--genai-python``: a Python with onnxruntime-genai whose transformers has what genai's builder imports (0.18.0's needs
transformers 5.x with Qwen3.5: 5.17.0 has it, 5.25.0 does not); without it, the builder rows are skipped and our ``@genai``
rows run in this Python when it has onnxruntime-genai. A light way to make one from this venv (seen working):
``pip install --no-deps --target OVERLAY transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.3 httpx httpcore h11``
and a script ``#!/bin/sh`` / ``PYTHONPATH=OVERLAY exec .venv/bin/python "$@"`` given as ``--genai-python``; both loops then
run the same onnxruntime (``onnxruntime_genai`` in the JSON names the versions).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dsk_compress.export.genai import byte_tokenizer_json
from dsk_compress.io import atomic_write_json
from dsk_compress.runtimes.decode import benchmark_decode
from dsk_compress.tasks import build_task

GENAI_SCRIPT = Path(__file__).with_name("genai_decode.py")
FINAL, PLAIN, FINAL_INT4 = "fused-int8", "plain-kv-int8", "final-int4"
IN_GENAI = "@genai"
"""Suffix of our fused graphs decoded by onnxruntime-genai's loop (``fused-int8@genai``)."""
COMPARED = (
    (FINAL, "fused-fp32"),
    ("fused-int4", "fused-fp32"),
    ("fused-fp32", "genai-fp32"),
    ("fused-int4", "genai-int4"),
    (FINAL, "genai-int4"),
    (FINAL_INT4, FINAL),
    (FINAL, "fused-int4"),
    ("fused-int8-dynamic", FINAL),
    ("fused-int8-nbits", FINAL),
    (FINAL, "fused-int8-separate"),
    # the graphs alone, in genai's loop: ours against its builder's at the same precision (int8: against its best, int4)
    ("fused-fp32" + IN_GENAI, "genai-fp32"),
    ("fused-int4" + IN_GENAI, "genai-int4"),
    (FINAL + IN_GENAI, "genai-int4"),
    (FINAL_INT4 + IN_GENAI, "genai-int4"),
    # the loops alone: the same graph in our loop against genai's
    (FINAL, FINAL + IN_GENAI),
    ("fused-fp32", "fused-fp32" + IN_GENAI),
    ("fused-int4", "fused-int4" + IN_GENAI),
)
"""Pairs (a, b) whose ratio ``a_vs_b`` the JSON gives besides the named ones (where both were timed), at each thread count."""
NAMED = {
    "final_vs_onnxruntime_genai": (FINAL, "genai best"),
    "final_vs_plain_kv": (FINAL, PLAIN),
    "final_int4_vs_onnxruntime_genai_int4": (FINAL_INT4, "genai-int4"),
    "final_in_genai_loop_vs_onnxruntime_genai": (FINAL + IN_GENAI, "genai best"),
    "final_int4_in_genai_loop_vs_onnxruntime_genai_int4": (FINAL_INT4 + IN_GENAI, "genai-int4"),
}
"""The issue's ratios; ``genai best`` is the faster of genai's builds at that thread count."""


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


def build_ours(
    run: Path,
    work: Path,
    parity_prompt: np.ndarray,
    log,
    task,
    threads: int | None,
    int8_kernels: tuple[str, ...] = (),
    other_qat: dict[str, Path] | None = None,
    graphs: dict[str, Path] | None = None,
) -> tuple[dict[str, Path], dict]:
    """Export the fused graphs and find (or export) the plain KV graphs; return their paths and, per fused graph, its
    parity against torch (the model it was exported from) and its accuracy on the task (scored through the graph itself,
    batch prefills). ``other_qat``: ``{label: QAT model dir}`` also exported as ``fused-int8-<label>``. ``graphs``:
    ``{label: fused graph}`` timed as they are (accuracy only); the run's int4 QAT graph, when its export stage made one,
    is ``final-int4`` unless ``graphs`` names it."""
    from transformers import AutoModelForCausalLM

    from dsk_compress.export.fused import check_fused_parity, export_fused
    from dsk_compress.export.onnx import fused_ops, op_histogram
    from dsk_compress.runtimes.decode import fused_predict

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
        info[name] = {
            **check_fused_parity(source[name], path, parity_prompt, 16),
            "fused_ops": fused_ops(op_histogram(path)),
            "reference": "torch fake-quant QAT model" if quant else "torch fp32 student",
            "accuracy": round(acc["accuracy"], 3),
            "bits_per_byte": round(acc["bits_per_byte"], 4),
        }
    arts = {}
    metrics = run / "export" / "metrics.json"
    if metrics.is_file():
        arts = json.loads(metrics.read_text()).get("artifacts", {})
    extra = dict(graphs or {})
    int4_qat = [
        a for a in arts.values() if str(a.get("role") or "").startswith("final") and a.get("precision") == "int4" and a.get("fused_path")
    ]
    if int4_qat and FINAL_INT4 not in extra and (run / int4_qat[0]["fused_path"]).is_file():
        extra[FINAL_INT4] = run / int4_qat[0]["fused_path"]
    for name, path in extra.items():
        log(f"task accuracy of {name} ({path})")
        acc = task.evaluate(fused_predict(path, threads)).as_dict()
        paths[name] = Path(path)
        info[name] = {
            "graph": str(path),
            "fused_ops": fused_ops(op_histogram(path)),
            "accuracy": round(acc["accuracy"], 3),
            "bits_per_byte": round(acc["bits_per_byte"], 4),
        }
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


def build_genai(python: str, student: Path, work: Path, precisions: list[str], log) -> tuple[dict[str, Path], str | None]:
    """Run onnxruntime-genai's model builder on a copy of ``student`` (+ tokenizer.json, eos id) for each precision
    (the thread count is set per run, :func:`run_genai`); ``({name: folder}, None)``, or ``({}, why)`` when it fails."""
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
        cmd = [
            python,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf),
            "-o",
            str(dst),
            "-p",
            prec,
            "-e",
            "cpu",
            "-c",
            str(work / "genai-cache"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            log(f"onnxruntime-genai builder failed for {prec}: {last}")
            return {}, f"onnxruntime-genai's builder failed ({prec}): {last[:300]}"
        out[f"genai-{prec}"] = dst
    return out, None


def build_ours_in_genai(paths: dict[str, Path], student: Path, work: Path, log) -> dict[str, Path]:
    """Our fused graphs as onnxruntime-genai folders (``dsk-compress export --format genai``'s writer), ``<name>@genai``."""
    from dsk_compress.export.genai import DecoderSource, decoder_shape, write_genai

    config = json.loads((student / "config.json").read_text())
    out = {}
    for name in (FINAL, "fused-fp32", "fused-int4", FINAL_INT4):
        if name not in paths:
            continue
        shape = decoder_shape(paths[name])
        src = DecoderSource(
            variant=name,
            precision=name.rsplit("-", 1)[-1],
            kind="fused",
            graph=Path(paths[name]),
            config=config,
            shape=shape,
            run_name=student.parent.parent.name,
            byte_level=True,
        )
        dst = work / f"{name}{IN_GENAI}"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        log(f"genai folder of {name}")
        write_genai(src, dst)
        out[name + IN_GENAI] = dst
    return out


def run_genai(
    python: str, model_dir: Path, prompt: np.ndarray, new_tokens: int, repeats: int, threads: int | None, profile: str | None = None
) -> dict:
    with tempfile.TemporaryDirectory(prefix="dsk-genai-") as tmp:
        p, out = Path(tmp) / "prompt.npy", Path(tmp) / "result.json"
        np.save(p, prompt)
        cmd = [
            python,
            str(GENAI_SCRIPT),
            "--model-dir",
            str(model_dir),
            "--prompt",
            str(p),
            "--new-tokens",
            str(new_tokens),
            "--repeats",
            str(repeats),
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
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
        out[phase] = {
            "runs": len(idx),
            "model_run_us": round(sum(runs[k][1] - runs[k][0] for k in idx) / n, 2),
            "kernel_us": round(total / n, 2),
            "operators": [
                {"op": op, "us": round(us / n, 2), "share": round(us / total, 3), "nodes": calls[phase][op] // n} for op, us in rows
            ],
        }
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
    prof = {
        name: top_operators(profile_ours(paths[name], prompt, args.new_tokens, t, work / f"profile-{name}"), args.new_tokens)
        for name in (FINAL, "fused-fp32", "fused-int4")
        if name in paths
    }
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
    """Medians over rounds per variant and thread count, and the ratios at each thread count, every one between two variants
    timed at that same count (``genai``: the names of genai's builder outputs; ``genai best`` in :data:`NAMED` is the faster
    of them at that count). ``best_threads`` (each variant's fastest count, by tokens/s) is information only: no ratio mixes
    thread counts."""
    med = {n: {t: _median(v, 2) for t, v in per.items() if v} for n, per in tok_s.items()}
    p50 = {n: {t: _median(v, 4) for t, v in per.items() if v} for n, per in step_p50.items()}
    pre = {n: {t: _median(v, 3) for t, v in per.items() if v} for n, per in prefill.items()}
    out = {
        "decode_tokens_per_s_median": {n: {str(t): v for t, v in per.items()} for n, per in med.items()},
        "decode_ms_p50_median": {n: {str(t): v for t, v in per.items()} for n, per in p50.items()},
        "prefill_ms_p50": {n: {str(t): v for t, v in per.items()} for n, per in pre.items()},
        "best_threads": {n: max(per, key=per.get) for n, per in med.items() if per},
        "ratios_at": {},
    }
    for t in threads:
        m = {n: per[t] for n, per in med.items() if t in per}
        m50 = {n: per[t] for n, per in p50.items() if t in per}
        mpre = {n: per[t] for n, per in pre.items() if t in per}
        g_best = max((n for n in genai if n in m), key=lambda n: m[n], default=None)
        pairs = {k: (a, g_best if b == "genai best" else b) for k, (a, b) in NAMED.items()}
        pairs.update({f"{a}_vs_{b}": (a, b) for a, b in COMPARED})
        prefill_pairs = {"fused_int8_vs_fused_fp32": (FINAL, "fused-fp32"), "plain_int8_vs_plain_fp32": (PLAIN, "plain-kv-fp32")}
        out["ratios_at"][str(t)] = {
            "genai_best": g_best,
            "tokens_per_s": _ratios(m, True, pairs),
            "step_p50": _ratios(m50, False, pairs),
            "prefill": _ratios(mpre, False, prefill_pairs),
        }
    out["headline"] = {
        key: {
            str(t): {
                "step_p50": out["ratios_at"][str(t)]["step_p50"].get(key),
                "tokens_per_s": out["ratios_at"][str(t)]["tokens_per_s"].get(key),
            }
            for t in threads
        }
        for key in NAMED
        if any(key in out["ratios_at"][str(t)]["step_p50"] for t in threads)
    }
    return out


RATIOS_BASIS = (
    "every ratio compares two variants timed at the same intra-op thread count (ratios_at.<threads>; headline: the "
    "issue's ratios at each count), by tokens/s (a / b) and by step p50 (b / a: > 1 means a is faster); best_threads is "
    "each variant's fastest count, for information only"
)


def resummarize(data: dict) -> dict:
    """``data`` (a decode.json of any version) with its medians and ratios rebuilt from the per-round figures it stores, by
    :func:`summarize`; the mixed-thread-count ratios of version 3 (``ratios``, ``ratios_from_step_p50``, ``prefill_speedup``,
    ``ratios_at.best``, ``genai_best``) are dropped."""
    threads = [int(t) for t in data["threads"]]

    def rounds(key: str) -> dict:
        return {n: {int(t): v for t, v in per.items()} for n, per in (data.get(key) or {}).items()}

    genai = [n for n in data["decode_tokens_per_s_rounds"] if n.startswith("genai-")]
    summary = summarize(rounds("decode_tokens_per_s_rounds"), rounds("decode_ms_p50_rounds"), rounds("prefill_ms_rounds"), threads, genai)
    out = {k: v for k, v in data.items() if k not in ("ratios", "ratios_from_step_p50", "prefill_speedup", "genai_best")}
    if data.get("version", 0) < 4:
        out["resummarized"] = (
            f"version {data.get('version')} -> 4 by benchmarks/decode.py --resummarize: medians and ratios rebuilt "
            "from this run's stored rounds (no new timing); its ratios that compared variants at different thread "
            "counts are gone"
        )
    out.update(summary, version=4, ratios_basis=RATIOS_BASIS)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, nargs="?")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    ap.add_argument("--work", type=Path, default=None, help="where the graphs are built (default RUN_DIR/bench-decode)")
    ap.add_argument(
        "--genai-python",
        default=None,
        help="a Python with onnxruntime-genai (0.18) whose transformers genai's builder "
        "imports (5.x with Qwen3.5); default: this Python for our @genai rows if it has onnxruntime-genai, no builder rows",
    )
    ap.add_argument("--genai-precisions", default="fp32,int4")
    ap.add_argument("--no-genai-loop", action="store_true", help="do not time our fused graphs inside onnxruntime-genai's loop")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per round")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts, each variant timed at each (comma-separated)")
    ap.add_argument("--profile", action="store_true", help="profile fused-int8/fp32/int4 and genai's best build (ORT's profiler)")
    ap.add_argument("--profile-threads", type=int, default=1)
    ap.add_argument("--note", default=None, help="free text stored in the JSON (e.g. that the machine was shared)")
    ap.add_argument(
        "--profile-only", action="store_true", help="no timing rounds: refresh parity, accuracy and the profile in the existing --out JSON"
    )
    ap.add_argument(
        "--resummarize",
        action="store_true",
        help="no run: rebuild the medians and ratios of the existing --out JSON from its per-round figures (equal thread counts only)",
    )
    ap.add_argument("--int8-kernels", default="", help="also time int8 alternatives: dynamic and/or nbits (export.fused int8_kernel)")
    ap.add_argument(
        "--other-qat",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also time the fused int8 graph of another QAT model dir as fused-int8-LABEL (e.g. one trained with a "
        "quantizer per Linear); repeatable",
    )
    ap.add_argument(
        "--graph",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also time this fused graph as LABEL (final-int4: an int4 QAT graph, compared with genai's int4); repeatable",
    )
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]

    def log(msg: str) -> None:
        print(f"[decode-bench] {msg}", file=sys.stderr, flush=True)

    if args.resummarize:
        out = resummarize(json.loads(Path(args.out).read_text()))
        atomic_write_json(args.out, out)
        print(json.dumps(out["headline"], indent=2))
        return
    if args.run_dir is None:
        ap.error("give a run directory (or --resummarize)")
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
    extra = {label: Path(p) for label, p in (a.split("=", 1) for a in args.graph)}
    paths, parity = build_ours(run, work, prompt, log, task, threads[0], tuple(k for k in args.int8_kernels.split(",") if k), other, extra)
    genai_skipped, genai, loop_python = None, {}, args.genai_python
    if args.genai_python and Path(args.genai_python).is_file():
        genai, genai_skipped = build_genai(args.genai_python, _float_student(run), work, args.genai_precisions.split(","), log)
    else:
        genai_skipped = (
            (f"--genai-python {args.genai_python!r} is not a file" if args.genai_python else "no --genai-python given")
            + ": onnxruntime-genai's builder skipped (give a Python with onnxruntime-genai==0.18.0, onnx_ir and a transformers 5.x "
            "that has what its builder imports)"
        )
        log(genai_skipped)
        loop_python = sys.executable if importlib.util.find_spec("onnxruntime_genai") else None
    ours_in_genai = {} if args.no_genai_loop or loop_python is None else build_ours_in_genai(paths, _float_student(run), work, log)
    nodes = {name: node_counts(path) for name, path in {**paths, **genai}.items()}

    if args.profile_only:
        out = json.loads(Path(args.out).read_text())
        out.update(parity=parity, nodes=nodes, profile_threads=args.profile_threads)
        t = str(args.profile_threads)
        best = (out.get("ratios_at", {}).get(t) or {}).get("genai_best") or out.get("genai_best")
        out["profile"] = profile_all(paths, genai, best, prompt, args, work, log)
        atomic_write_json(args.out, out)
        print(json.dumps(out["profile"], indent=2))
        return

    in_genai_loop = {**genai, **ours_in_genai}
    variants = {**paths, **in_genai_loop}
    names = list(variants)
    load_start = round(os.getloadavg()[0], 2)  # 1-minute load average: how busy the machine was
    if load_start > 0.5 * (os.cpu_count() or 1):
        log(f"load average {load_start} on {os.cpu_count()} CPUs: the machine is busy, the figures will not stand for it quiet")
    load_rounds = []
    tok_s = {n: {t: [] for t in threads} for n in variants}
    step_p50 = {n: {t: [] for t in threads} for n in variants}
    prefill = {n: {t: [] for t in threads} for n in paths}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):  # interleaved: every variant at every thread count once per round, the order rotated
        load_rounds.append(round(os.getloadavg()[0], 2))
        log(f"round {r + 1}/{args.rounds} (load average {load_rounds[-1]})")
        order = names[r % len(names) :] + names[: r % len(names)]
        for t in threads:
            for name in order:
                path = variants[name]
                if name in in_genai_loop:
                    res = run_genai(
                        loop_python if name in ours_in_genai else args.genai_python, path, prompt, args.new_tokens, args.repeats, t
                    )
                else:
                    res = benchmark_decode(path, prompt, args.new_tokens, t, repeats=args.repeats, warmup=1)
                    pre = benchmark_decode(path, long_prompt, 0, t, repeats=args.repeats, warmup=1)
                    prefill[name][t].append(pre["prefill_ms"])
                tok_s[name][t].append(res["decode_tokens_per_s"])
                step_p50[name][t].append(res["decode_ms_p50"])
                # genai's loop keeps the prompt's choice as the first new token; ours returns it first as well
                tokens[name] = res["tokens"][: args.new_tokens]

    summary = summarize(tok_s, step_p50, prefill, threads, genai)
    same_pairs = [
        ("fused-fp32", "genai-fp32"),
        ("fused-fp32", "plain-kv-fp32"),
        (FINAL, PLAIN),
        *((n[: -len(IN_GENAI)], n) for n in ours_in_genai),
    ]
    same = {f"{a}=={b}": tokens[a] == tokens[b] for a, b in same_pairs if a in tokens and b in tokens}
    import onnxruntime

    out = {
        "version": 4,
        "run": str(run),
        "machine": f"{os.cpu_count()} CPUs",
        "note": args.note,
        "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "load_average_rounds": load_rounds,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_genai": _genai_versions(args.genai_python, loop_python),
        "batch_size": 1,
        "prompt_tokens": int(prompt.size),
        "new_tokens": args.new_tokens,
        "prefill_tokens": int(long_prompt.size),
        "threads": threads,
        "rounds": args.rounds,
        "repeats_per_round": args.repeats,
        "ratios_basis": RATIOS_BASIS,
        **summary,
        "nodes": nodes,
        "decode_tokens_per_s_rounds": {n: {str(t): v for t, v in per.items()} for n, per in tok_s.items()},
        "decode_ms_p50_rounds": {n: {str(t): v for t, v in per.items()} for n, per in step_p50.items()},
        "prefill_ms_rounds": {n: {str(t): v for t, v in per.items()} for n, per in prefill.items()},
        "genai_skipped": genai_skipped,
        "same_greedy_tokens": same,
        "parity": parity,
        "artifacts": {n: str(p) for n, p in variants.items()},
    }
    if args.profile:
        out["profile_threads"] = args.profile_threads
        best = summary["ratios_at"].get(str(args.profile_threads), {}).get("genai_best")
        out["profile"] = profile_all(paths, genai, best, prompt, args, work, log)
    atomic_write_json(args.out, out)
    print(
        json.dumps(
            {
                k: out[k]
                for k in ("decode_tokens_per_s_median", "decode_ms_p50_median", "headline", "same_greedy_tokens", "load_average_rounds")
            },
            indent=2,
        )
    )


def _genai_versions(*pythons: str | None) -> dict[str, str]:
    """``{python: "onnxruntime-genai X, onnxruntime Y"}`` of the Pythons that ran genai's loop."""
    out = {}
    for py in dict.fromkeys(p for p in pythons if p):
        proc = subprocess.run(
            [py, "-c", "import onnxruntime_genai as g, onnxruntime as o; print(g.__version__, o.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0:
            g, o = proc.stdout.split()
            out[py] = f"onnxruntime-genai {g}, onnxruntime {o}"
    return out


if __name__ == "__main__":
    main()
