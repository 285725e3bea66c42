"""Deploy bundles: one folder per target device with the model, a model card, ``run.py`` and requirements.

``run.py`` (:mod:`dsk_compress.export.bundle_run`, copied as is) needs only numpy and onnxruntime (TensorRT
and torch optional on Jetson, ``tokenizers`` for a text model): it measures the model with dsk-compress's
benchmark method (shipped beside it as ``dsk_measure.py``, a copy of :mod:`dsk_compress.runtimes.measure`;
``dsk_trt.py`` is :mod:`dsk_compress.runtimes.trt_compat`) and evaluates it on the validation windows shipped
in the bundle, so the accuracy and latency a user sees on the device are measured there, and its
``results.json`` is a bench result that ``dsk-compress bench`` merges into the run's report. When the shipped
student has decoder graphs they are bundled as ``model.fused.onnx`` (:mod:`dsk_compress.export.fused`: ONNX Runtime's
fused operators, one shared KV buffer per layer, decoded with IO binding by ``dsk_decoder.py``, a copy of
:mod:`dsk_compress.runtimes.decoder`) and ``model.kv.onnx`` (the plain KV-cache graph, for GPU providers), and
``run.py --generate N`` measures greedy decode tokens/s (``--prompt TEXT`` prints the continuation, through the
bundle's tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from dsk_compress.errors import RunError
from dsk_compress.io import atomic_write_json, atomic_write_text
from dsk_compress.runtimes import decoder, measure, trt_compat

RUN_PY = Path(__file__).with_name("bundle_run.py")
"""The bundle's run.py (a script, never imported here: it expects to sit beside ``dsk_measure.py``)."""
CARD_VERSION = 2
BATCHES = (1, 8, 64)
ORT_FLOOR = "1.18"
"""The oldest onnxruntime that loads the exported graphs: the ORT-optimized files use the ``ai.onnx.ml`` opset 5,
which 1.17 refuses (checked with 1.17.3 and 1.18.1, numpy 1.26.4, on x86-64; see docs/devices.md)."""
NUMPY_FLOOR = "1.24"
TOKENIZERS_FLOOR = "0.20"
"""tokenizers 0.20 changed the BPE merges in tokenizer.json; 0.19.1 cannot read what 0.22 writes, 0.20.0 can (checked)."""

_ROLE_FOR = {"int8": "final", "fp16": "student-fp16", "fp32": "student"}
_HINT_FOR = {"int8": "run a recipe with qat, export and bench stages",
             "fp16": "rerun the export stage with precisions: [fp32, fp16] (or device: <this device>) and bench",
             "fp32": "run a recipe with export and bench stages"}


def _pick_variant(report: dict, precision: str) -> dict:
    """The host row that ships at ``precision``: the QAT student (int8), its fp16 export, or the last fp32 student
    (rows of the reference runtime: not the ``name [runtime]`` rows of further runtimes)."""
    want = [v for v in report["variants"] if v["role"] == _ROLE_FOR[precision] and " [" not in v["name"]][-1:]
    if not want or not want[0].get("artifact"):
        raise RunError(f"the run has no {precision} student artifact to bundle", hint=_HINT_FOR[precision])
    return want[0]


def _export_artifacts(manifest: dict) -> dict:
    for st in manifest.get("stages", []):
        if st.get("stage") == "export":
            return (st.get("outputs") or {}).get("artifacts", {})
    return {}


def _tensorrt_model(run_dir: Path, v: dict, art: dict, device: str) -> tuple[Path, dict]:
    """The portable ONNX TensorRT parses for this variant (the ORT-optimized file holds contrib ops) and its check."""
    from dsk_compress.export.trt_check import check_tensorrt_onnx, format_problems

    rel = art.get("qdq_path") if v["precision"] == "int8" else v["artifact"]
    if not rel:
        raise RunError(f"the run's {v['name']} has no TensorRT-portable ONNX (it predates portable exports)",
                       hint=f"rerun the export stage with device: {device}")
    path = run_dir / rel
    problems = check_tensorrt_onnx(path)
    if problems:
        hint = ("retrain with the qat stage's activations: symmetric, then export with device: " + device
                if any(p.kind in ("uint8", "zero_point") for p in problems) else "rerun the export stage with device: " + device)
        raise RunError(f"{v['name']} cannot run in TensorRT on {device}: {format_problems(problems, 3)}", hint=hint)
    return path, {"checked": "dsk_compress.export.trt_check: 0 problems"}


def make_bundle(run_dir: str | Path, device: str, out: str | Path | None = None) -> Path:
    """Write a deploy bundle of a finished run for ``device`` and return its folder."""
    from dsk_compress.devices import load_device
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.report import load_report
    from dsk_compress.tasks import build_task

    from dsk_compress.integrity import check_run_artifacts

    run_dir = Path(run_dir)
    check_run_artifacts(run_dir)  # recorded hashes match and every ONNX file loads, before anything is copied
    report = load_report(run_dir)
    prof = load_device(device)
    precision = prof.preferred_precision  # fp32, fp16 or int8, as the device profile prefers
    v = _pick_variant(report, precision)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = RecipeSpec.model_validate(manifest["recipe"])
    task = build_task(spec.task.model_dump())
    if getattr(task, "seq_len", None) is None or not hasattr(task, "eval_windows"):
        raise RunError(f"bundles are written for language-model runs, and this run's task is {spec.task.model_dump().get('name', 'your own')}",
                       hint="measure your own model's ONNX files with dsk-compress bench RUN on the machine itself")
    runtime = "tensorrt" if prof.preferred_runtime == "tensorrt" else "onnxruntime"
    model_src, trt_card = run_dir / v["artifact"], None
    if runtime == "tensorrt":
        model_src, trt_card = _tensorrt_model(run_dir, v, _export_artifacts(manifest).get(v["name"], {}), prof.name)
        exp = next((st for st in spec.stages if st.stage == "export"), None)
        t = exp.tensorrt if exp is not None else None
        trt_card.update({"precision": precision, "workspace_gb": t.workspace_gb if t else 1.0, "max_batch": t.max_batch if t else 8,
                         "opt_batch": t.opt_batch if t else 1, "max_seq_len": t.max_seq_len if t else None})
    dest = Path(out) if out else run_dir / "bundles" / prof.name
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(model_src, tmp / "model.onnx")
    art = _export_artifacts(manifest).get(v["name"], {})
    for key, name in (("fused_path", "model.fused.onnx"), ("kv_cache_path", "model.kv.onnx")):
        if art.get(key) and (run_dir / art[key]).is_file():  # greedy decode runs on onnxruntime, whatever the full-sequence runtime
            shutil.copy2(run_dir / art[key], tmp / name)
    td = task.describe()
    windows = task.eval_windows()
    vocab = max(int(td.get("vocab_size") or 256), int(windows.max()) + 1)
    np.save(tmp / "eval_windows.npy", windows.astype(window_dtype(vocab)))
    tokenizer = _save_tokenizer(task, tmp) if td["name"] == "text-lm" else None
    for src, name in ((measure.__file__, "dsk_measure.py"), (decoder.__file__, "dsk_decoder.py"), (trt_compat.__file__, "dsk_trt.py"),
                      (RUN_PY, "run.py")):
        atomic_write_text(tmp / name, Path(src).read_text())
    card = {
        "version": CARD_VERSION, "model": "model.onnx", "variant": v["name"], "role": v.get("role"), "precision": v["precision"],
        "device": prof.name, "runtime": runtime, "execution_providers": list(prof.execution_providers), "threads": prof.threads,
        "graph_optimization": "extended", "batches": list(BATCHES), "seq_len": task.seq_len, "task": td,
        "eval_windows": "eval_windows.npy", "eval_batch_size": _eval_batch_size(task), "logits_dtype": np.dtype(task.logits_dtype).name,
        "vocab_size": vocab, "tokenizer": tokenizer, "tensorrt": trt_card,
        "kv_model": "model.kv.onnx" if (tmp / "model.kv.onnx").is_file() else None,
        "fused_model": "model.fused.onnx" if (tmp / "model.fused.onnx").is_file() else None,
        "params": v.get("params"), "size_bytes": v.get("size_bytes"),
        "measured_on_build_host": {"accuracy": v.get("accuracy"), "metrics": v.get("metrics"), "latency_ms": v.get("latency_ms"),
                                   "runtime": v.get("runtime"), "host": report.get("host")},
        "source_run": run_dir.name, "recipe": spec.name,
    }
    atomic_write_json(tmp / "model_card.json", card)
    atomic_write_text(tmp / "requirements.txt", requirements(runtime, tokenizer is not None))
    atomic_write_text(tmp / "README.md", _readme(spec.name, prof, v, precision, trt_card, tmp, tokenizer is not None))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def window_dtype(vocab_size: int):
    """The smallest unsigned dtype that holds every token id below ``vocab_size`` (uint8, uint16, else int32)."""
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.int32


def requirements(runtime: str, tokenizer: bool) -> str:
    """``requirements.txt`` of a bundle: floors that load its files (see :data:`ORT_FLOOR`)."""
    reqs = [f"numpy>={NUMPY_FLOOR}", f"onnxruntime>={ORT_FLOOR}"]
    if tokenizer:
        reqs.append(f"tokenizers>={TOKENIZERS_FLOOR}")
    if runtime == "tensorrt":
        reqs.append("# on Jetson: TensorRT and torch come with JetPack (onnxruntime-gpu from NVIDIA's Jetson wheels adds the CUDA and "
                    "TensorRT providers); run.py falls back to onnxruntime on the CPU without them")
    return "\n".join(reqs) + "\n"


def _eval_batch_size(task) -> int:
    """The batch the task scores its validation windows in (its ``evaluate`` default): run.py scores in the same batches."""
    import inspect

    return int(inspect.signature(task.evaluate).parameters["batch_size"].default)


def _save_tokenizer(task, dest: Path) -> str:
    """Write the text-lm task's tokenizer as ``tokenizer.json`` (the ``tokenizers`` format run.py reads)."""
    backend = getattr(task.tok, "backend_tokenizer", None)
    if backend is None:
        raise RunError("text-lm bundles ship the tokenizer as a tokenizers tokenizer.json, and this teacher's tokenizer is a slow "
                       "(Python) one", hint="give the teacher a fast tokenizer (tokenizer.json beside its config)")
    backend.save(str(dest / "tokenizer.json"))
    return "tokenizer.json"


def _decoder_files(fused: bool, kv: bool) -> str:
    parts = (["`model.fused.onnx` is the same model as one decoder graph of ONNX Runtime's fused operators (GroupQueryAttention "
              "appending to one preallocated KV buffer per layer, decoded with IO binding; used on the CPU)"] if fused else []) + \
            (["`model.kv.onnx` is the same model with a plain KV cache" + (" (used with a GPU provider)" if fused else "")] if kv else [])
    return "; ".join(parts)


def _readme(recipe: str, prof, v: dict, precision: str, trt_card: dict | None, folder: Path, tokenizer: bool) -> str:
    p50 = (v.get("latency_ms") or {}).get("p50")
    fused, kv = (folder / "model.fused.onnx").is_file(), (folder / "model.kv.onnx").is_file()
    prompt = "'The '" if tokenizer else "'def '"
    return (
        f"# {recipe} for {prof.name}\n\n{prof.description}\n\n"
        f"Model: `{v['name']}` ({v['precision']}, {v.get('params') or 0:,} parameters, {(v.get('size_bytes') or 0) / 1e6:.2f} MB).\n"
        f"Measured on the build host ({v.get('runtime')}): accuracy {v.get('accuracy') or 0:.2f}%"
        + (f", p50 {p50:.2f} ms at batch 1" if p50 is not None else "") + ".\n"
        "These are not device figures: measure on the device. Raspberry Pi OS Bookworm and Debian 12 refuse `pip install` "
        "outside a virtual environment (externally-managed-environment), so make one in this folder:\n\n"
        "```bash\nsudo apt install python3-venv        # if python3 -m venv says ensurepip is missing\n"
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt\n"
        ".venv/bin/python run.py --out results.json\n```\n\n"
        "`results.json` holds session creation time, first inference, p50/p90/p99 at batch 1, throughput at batch 8 and 64 "
        "where the model allows, peak memory, accuracy on the bundled evaluation windows and where it was measured "
        "(CPU, runtime and version, execution provider, threads). `dsk-compress bench RUN --device "
        f"{prof.name} --host user@board` does all of this over SSH and adds the numbers to the run's report.\n"
        + (f"\n{_decoder_files(fused, kv)}: `.venv/bin/python run.py --generate 64 --prompt {prompt}` also "
           "measures greedy decode (prefill ms, ms per token, tokens/s) and prints the continuation"
           + (" (text through the bundled `tokenizer.json`)" if tokenizer else "") + ".\n" if fused or kv else "")
        + ("\nWith TensorRT (JetPack) and torch present, the first run builds a TensorRT engine for this GPU "
           f"({precision}, profile batch 1..{trt_card['max_batch']}) and caches it as `model.<trt version>.<gpu>.engine`; "
           "later runs load it. Without them, run.py falls back to onnxruntime. onnxruntime's CUDA and TensorRT execution "
           "providers are used when the installed onnxruntime has them.\n" if trt_card is not None else "")
    )
