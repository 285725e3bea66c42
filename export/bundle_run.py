#!/usr/bin/env python3
"""Benchmark and evaluate this bundle's model on the machine it runs on; write results.json.

Needs numpy and onnxruntime (and the ``tokenizers`` package for a text model's tokenizer); on a Jetson,
TensorRT and torch from JetPack for ``--runtime tensorrt``. The measurement is dsk-compress's benchmark
method, shipped beside this file as ``dsk_measure.py``: session creation, first inference, warm-up, timed
runs at batch 1 and throughput at 8 and 64 where the model allows, peak memory, accuracy on the bundle's
evaluation windows and, with ``--generate N``, greedy decode tokens/s. ``results.json`` has the layout of
dsk-compress's bench results, which ``dsk-compress bench`` reads back into the run's report.

    python3 run.py                                # latency, throughput and accuracy measured here
    python3 run.py --generate 64 --prompt "def "  # also greedy decode, printing the continuation
    python3 run.py --variant all                  # every variant the bundle carries, one record each

A bundle made for several variants (``dsk-compress bench RUN --host H --variants all``) lists them in its card's
``variants``; ``--variant all`` (or ``NAME,NAME``) measures each in a fresh process of this script (its own peak
memory, nothing held over from the one before) and writes one record per variant into results.json.

A missing or damaged bundle file (the model card, the model, the evaluation windows, the tokenizer), or a card that
names a file outside this folder, is one line on stderr starting with ``error:`` and exit status 2, before anything is
measured or written.
"""
# Shipped in every deploy bundle as run.py (Python 3.8+, numpy + onnxruntime): no dsk-compress import here.

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
try:  # the bundle's copies (python3 run.py puts this folder first on sys.path) of dsk_compress.runtimes.measure, .decoder, .trt_compat
    import dsk_decoder as D
    import dsk_measure as M
    import dsk_trt
except ImportError:  # run from the dsk-compress source tree
    from dsk_compress.runtimes import decoder as D
    from dsk_compress.runtimes import measure as M
    from dsk_compress.runtimes import trt_compat as dsk_trt

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class BundleError(Exception):
    """A bundle file that is missing, damaged or names a path outside the bundle: one line and exit status 2."""


HINT = "copy the bundle again (dsk-compress export RUN --device DEVICE writes it)"


def _first_line(e):
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def load_card(bundle=HERE):
    """The bundle's ``model_card.json``, checked (see :func:`check_card`)."""
    path = Path(bundle) / "model_card.json"
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except FileNotFoundError:
        raise BundleError("%s is missing: this folder is not a complete bundle (%s)" % (path, HINT)) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise BundleError("%s is damaged: %s (%s)" % (path, _first_line(e), HINT)) from None
    except OSError as e:
        raise BundleError("cannot read %s: %s" % (path, e.strerror or e)) from None
    if not isinstance(card, dict):
        raise BundleError("%s is not a model card (a JSON %s, not an object) (%s)" % (path, type(card).__name__, HINT))
    check_card(card, Path(bundle))
    return card


_REQUIRED = (
    ("model", str),
    ("variant", str),
    ("precision", str),
    ("runtime", str),
    ("seq_len", int),
    ("eval_windows", str),
    ("eval_batch_size", int),
    ("logits_dtype", str),
    ("task", dict),
)


def check_card(card, bundle=HERE):
    """Every field run.py reads has the type it needs, and every file the card names lies inside the bundle."""
    where = "model_card.json"
    for key, kind in _REQUIRED:
        if key not in card:
            raise BundleError("%s has no %r field (%s)" % (where, key, HINT))
        v = card[key]
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v <= 0) or (kind is str and not v):
            raise BundleError("%s: %r is %r, not a %s" % (where, key, v, "positive integer" if kind is int else kind.__name__))
    if not isinstance(card["task"].get("name"), str):
        raise BundleError("%s: task has no name (%s)" % (where, HINT))
    if card["runtime"] not in ("onnxruntime", "tensorrt"):
        raise BundleError("%s: runtime %r is not onnxruntime or tensorrt" % (where, card["runtime"]))
    level = card.get("graph_optimization", "extended")
    if level not in ORT_LEVELS:
        raise BundleError("%s: graph_optimization %r is not one of %s" % (where, level, ", ".join(ORT_LEVELS)))
    threads = card.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0):
        raise BundleError("%s: threads %r is not a positive integer" % (where, threads))
    batches = card.get("batches", [1, 8, 64])
    if not isinstance(batches, list) or not batches or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batches):
        raise BundleError("%s: batches %r is not a list of positive integers" % (where, batches))
    eps = card.get("execution_providers")
    if eps is not None and not (isinstance(eps, list) and all(isinstance(p, str) for p in eps)):
        raise BundleError("%s: execution_providers %r is not a list of names" % (where, eps))
    try:
        np.dtype(card["logits_dtype"])
    except TypeError:
        raise BundleError("%s: logits_dtype %r is not a numpy dtype" % (where, card["logits_dtype"])) from None
    for key in ("model", "eval_windows", "tokenizer", "kv_model", "fused_model"):
        if card.get(key) is not None:
            bundle_file(card, key, bundle)
    if card.get("tensorrt") is not None and not isinstance(card["tensorrt"], dict):
        raise BundleError("%s: tensorrt %r is not an object" % (where, card["tensorrt"]))
    entries = card.get("variants")
    if entries is not None:
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise BundleError("%s: variants is not a list of objects (%s)" % (where, HINT))
        seen = set()
        for e in entries:
            name = e.get("variant")
            if not isinstance(name, str) or not name or name in seen or name == "all" or "," in name:
                raise BundleError("%s: variants holds %r, not a unique variant name (%s)" % (where, name, HINT))
            seen.add(name)
            if not isinstance(e.get("precision"), str) or not e["precision"]:
                raise BundleError("%s: variant %r has no precision (%s)" % (where, name, HINT))
            for key in ("model", "kv_model", "fused_model"):
                if key == "model" or e.get(key) is not None:
                    bundle_file(e, key, bundle)


VARIANT_KEYS = ("variant", "role", "precision", "model", "kv_model", "fused_model", "params", "size_bytes", "measured_on_build_host")


def variant_cards(card, chosen):
    """The cards of the variants ``chosen`` names (``all``, or ``NAME,NAME``) among the card's ``variants``: the bundle's
    card with that variant's model, decoder graphs and facts. Raises BundleError for a name the bundle does not carry."""
    entries = card.get("variants") or [{k: card.get(k) for k in VARIANT_KEYS}]
    by_name = {e["variant"]: e for e in entries}
    names = list(by_name) if chosen == "all" else [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise BundleError("--variant %r: this bundle carries %s (or all)" % (chosen, ", ".join(by_name)))
    return [dict(card, **{k: by_name[n].get(k) for k in VARIANT_KEYS}) for n in dict.fromkeys(names)]


def bundle_file(card, key, bundle=HERE):
    """The file the card's ``key`` names, which must be a relative path that stays inside the bundle (links followed)."""
    rel = card.get(key)
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BundleError("model_card.json: %s %r is not a file name" % (key, rel))
    root = os.path.realpath(str(bundle))
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.isabs(rel) or os.path.commonpath([root, real]) != root:
        raise BundleError("model_card.json: %s %r is outside the bundle: a bundle reads only its own files (%s)" % (key, rel, HINT))
    return Path(bundle) / rel


def existing_file(card, key, what):
    path = bundle_file(card, key)
    if not path.is_file():
        raise BundleError("%s %s is missing (%s)" % (what, path, HINT))
    return path


def graph_bytes(path):
    """Bytes of the graph at ``path`` with its external-data file (``<name>.onnx.data``, a graph past 1 GiB) when it has one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def load_windows(card):
    """The evaluation windows: a 2-D integer array, read without pickle (an object array is refused)."""
    path = existing_file(card, "eval_windows", "the evaluation windows")
    try:
        w = np.load(str(path), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BundleError("%s cannot be read as a numpy array: %s (%s)" % (path, _first_line(e), HINT)) from None
    if not isinstance(w, np.ndarray) or w.ndim != 2 or w.dtype.kind not in "ui" or w.shape[0] < 1 or w.shape[1] < 2:
        raise BundleError("%s is not a 2-D integer array of token windows (%s)" % (path, HINT))
    return w


# --------------------------------------------------------------------------- onnxruntime


def ort_providers(card, requested=None):
    """Execution providers to use: ``requested``, else those of the device profile this onnxruntime offers, CPU last."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in have]
        if missing:
            raise BundleError("execution provider(s) %s not in this onnxruntime (it has %s)" % (", ".join(missing), ", ".join(have)))
        chain = list(requested)
    else:
        chain = [p for p in card.get("execution_providers") or [CPU] if p in have]
    return chain + ([CPU] if CPU not in chain else [])


def ort_session(card, path, threads, providers):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[card.get("graph_optimization", "extended")])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not Path(path).is_file():
        raise BundleError("the model %s is missing (%s)" % (path, HINT))
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime's own InvalidProtobuf / Fail / InvalidGraph classes
        raise BundleError("the model %s does not load in onnxruntime %s: %s" % (path, ort.__version__, _first_line(e))) from None


def ort_runtime(card, threads, providers):
    """``(predict, timed_predict, runtime info)`` of the bundle's model in onnxruntime."""
    import onnxruntime as ort

    sess = ort_session(card, bundle_file(card, "model"), threads, providers)
    name = sess.get_inputs()[0].name
    used = list(sess.get_providers())
    if D.is_fused_graph(sess):  # the bundle's one graph is the fused decoder: whole windows from an empty cache
        predict = D.FusedFullSequence(sess)
    else:

        def predict(x):
            return sess.run(None, {name: np.asarray(x).astype(np.int64)})[0]

    info = {
        "name": "onnxruntime",
        "version": ort.__version__,
        "mode": card.get("graph_optimization", "extended"),
        "execution_provider": used[0],
        "providers": used,
        "device": "cuda:0" if used[0] in GPU_PROVIDERS else "cpu",
        "threads": threads,
    }
    return predict, predict, info


# --------------------------------------------------------------------------- TensorRT


class Unavailable(Exception):
    """TensorRT cannot run here (no CUDA device, a TensorRT older than 8.5)."""


def trt_runtime(card):
    """``(predict, timed_predict, runtime info)`` with a TensorRT engine, built here on the first run and cached.

    Engines are specific to the GPU and the TensorRT version: the first run builds one with the precision and
    shape profile the model card names and caches it beside the model; later runs load it. ``predict`` returns
    host arrays (for scoring); ``timed_predict`` keeps each batch on the GPU and only synchronises, as the host's
    bench worker does.
    """
    import tensorrt as trt
    import torch

    why = dsk_trt.unsupported_reason(trt) or (None if torch.cuda.is_available() else "no CUDA device")
    if why:
        raise Unavailable(why)
    spec = card.get("tensorrt") or {}
    precision = card["precision"]
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    gpu = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in torch.cuda.get_device_name(0))
    engine_path = bundle_file(card, "model").parent / ("model.%s.%s.engine" % (trt.__version__, gpu))  # one per variant
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes()) if engine_path.is_file() else None
    if engine is None:
        engine = _build_engine(trt, logger, runtime, card, spec, precision, engine_path)
    ctx = engine.create_execution_context()
    stream = torch.cuda.Stream()
    inputs, outputs = dsk_trt.io_names(trt, engine)
    dtype = {trt.DataType.INT32: torch.int32}.get(engine.get_tensor_dtype(inputs[0]), torch.int64)
    held = {}

    def on_gpu(x):
        inp = torch.as_tensor(np.asarray(x), device="cuda").to(dtype).contiguous()
        ctx.set_input_shape(inputs[0], tuple(inp.shape))
        out = torch.empty(tuple(ctx.get_tensor_shape(outputs[0])), dtype=torch.float32, device="cuda")
        dsk_trt.execute(ctx, {inputs[0]: inp.data_ptr(), outputs[0]: out.data_ptr()}, {inputs[0]: tuple(inp.shape)}, stream.cuda_stream)
        stream.synchronize()
        return out

    def timed(x):  # time_model keeps its batch alive while it times it: one upload per batch
        if held.get("key") != (id(x), x.shape):
            held.update(key=(id(x), x.shape), x=torch.as_tensor(np.asarray(x), device="cuda").to(dtype))
        return on_gpu(held["x"])

    info = {
        "name": "tensorrt",
        "version": trt.__version__,
        "device": "cuda:0",
        "gpu": torch.cuda.get_device_name(0),
        "engine_device_memory_mb": (dsk_trt.device_memory_bytes(engine) or 0) / (1 << 20),
    }
    return (lambda x: on_gpu(x).cpu().numpy()), timed, info


def _build_engine(trt, logger, runtime, card, spec, precision, engine_path):
    has_fp16 = precision == "fp16"  # the bundle's fp16 model is an fp16 ONNX
    strong = dsk_trt.use_strong_typing(trt, precision, has_fp16)
    builder = trt.Builder(logger)
    network = builder.create_network(dsk_trt.network_flags(trt, strong))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle_file(card, "model"))):
        raise BundleError("TensorRT could not parse the model: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.get("workspace_gb", 1.0) * (1 << 30)))
    dsk_trt.set_precision_flags(trt, config, precision, strong)
    seq = spec.get("max_seq_len") or card["seq_len"]
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, (1, 1), (spec.get("opt_batch", 1), seq), (spec.get("max_batch", 8), seq))
    config.add_optimization_profile(profile)
    cache_file = HERE / "timing.cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, False)
    print("building the TensorRT engine (%s, TensorRT %s, once per device)..." % (precision, trt.__version__))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError("TensorRT failed to build the engine (see the log above)")
    engine_path.write_bytes(bytes(plan))
    cache_file.write_bytes(bytes(cache.serialize()))
    return runtime.deserialize_cuda_engine(bytes(plan))


# --------------------------------------------------------------------------- text


class Codec:
    """Text <-> token ids: the bundle's ``tokenizer.json`` (``tokenizers`` package) for text-lm, UTF-8 bytes for code-lm."""

    def __init__(self, card):
        self.tok = None
        if card.get("tokenizer"):
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise BundleError("this bundle's model reads tokens of its own tokenizer: pip install tokenizers") from None
            path = existing_file(card, "tokenizer", "the tokenizer")
            try:
                self.tok = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises its own Exception for a file it cannot parse
                raise BundleError("the tokenizer %s cannot be read: %s (%s)" % (path, _first_line(e), HINT)) from None

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids if self.tok else list(text.encode("utf-8"))

    def decode(self, ids):
        return self.tok.decode(ids) if self.tok else bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def decoder_graph(card, providers):
    """The decoder graph ``--generate`` runs: the fused one (GroupQueryAttention on one shared KV buffer, IO binding) on the
    CPU provider, which is where its fp32 / int8 kernels are; the plain KV-cache graph with a GPU provider or without it."""
    if card.get("fused_model") and list(providers) == [CPU]:
        return card["fused_model"]
    return card.get("kv_model") or card.get("fused_model")


def generate(card, threads, providers, prompt, new_tokens, repeats=5):
    """Greedy decode with :func:`decoder_graph` in onnxruntime with ``providers``: ``dsk_decoder`` sessions timed by
    ``dsk_measure.decode_loop``, as the host's bench stage does."""
    graph = decoder_graph(card, providers)
    sess = ort_session(card, bundle_file(card, "fused_model" if graph == card.get("fused_model") else "kv_model"), threads, providers)
    prompt = np.asarray(prompt, np.int64)
    prefill, step = D.decode_steps(D.decoder_for(sess), prompt, new_tokens)
    out = M.decode_loop(prefill, step, len(prompt), new_tokens, repeats=repeats)
    out.update(execution_provider=sess.get_providers()[0], artifact=graph)
    return out


# --------------------------------------------------------------------------- main


def parse_args(card, argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", choices=["onnxruntime", "tensorrt"], default=card["runtime"])
    ap.add_argument(
        "--provider",
        action="append",
        default=None,
        metavar="NAME",
        help="onnxruntime execution provider, repeatable, in priority order (default: the device profile's that "
        "this onnxruntime has, e.g. TensorrtExecutionProvider, CUDAExecutionProvider; CPU last)",
    )
    ap.add_argument("--threads", type=int, default=card.get("threads"))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--duration", type=float, default=None, help="time each batch size for this many seconds instead of --runs")
    ap.add_argument(
        "--batches",
        default=",".join(str(b) for b in card.get("batches", [1, 8, 64])),
        help="batch sizes, the first is the latency batch (default %(default)s)",
    )
    ap.add_argument("--no-eval", action="store_true", help="skip the accuracy on the evaluation windows")
    ap.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="also time greedy decode of N tokens with the bundle's decoder graph (model.fused.onnx on the CPU, else model.kv.onnx)",
    )
    ap.add_argument(
        "--prompt",
        default=None,
        help="text to continue with --generate (default: half of the first evaluation window); the continuation is printed",
    )
    ap.add_argument(
        "--measurement",
        choices=["measured", "emulated"],
        default="measured",
        help="emulated: this Python runs under an emulator; timings are then the emulator's (detected by itself too: "
        "measured is never written for an emulated Python)",
    )
    ap.add_argument(
        "--variant",
        default=None,
        metavar="NAME|all",
        help="with a bundle of several variants: measure this one, NAME,NAME or all of them (one record each; "
        "default: the bundle's own, %s)" % card["variant"],
    )
    ap.add_argument("--out", default="results.json")
    a = ap.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",")]
    if a.variant is not None:  # --generate is checked per variant: one without a decoder graph is measured without it
        if a.prompt is not None and not a.generate:
            ap.error("--prompt goes with --generate N")
        return a
    if a.generate and not (card.get("fused_model") or card.get("kv_model")):
        ap.error(
            "--generate needs a decoder graph (model.fused.onnx or model.kv.onnx), and this bundle has none (export with kv_cache: true)"
        )
    if a.prompt is not None and not a.generate:
        ap.error("--prompt goes with --generate N")
    return a


def emulation():
    """Why this Python looks emulated (e.g. arm64 Python under qemu-user on an x86 machine), or None.

    Under qemu-user the emulated ``uname()`` says aarch64, but a native program it starts (``uname -m``) runs on the real
    kernel and says x86_64; an x86 ``/proc/cpuinfo`` seen from an ARM Python, or a qemu binfmt handler for this Python's
    own machine, say the same. Timings under an emulator are the emulator's, so results are labelled emulated."""
    import platform
    import subprocess

    mine = platform.machine()
    try:
        native = subprocess.run(["uname", "-m"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        native = ""
    if native and M.machine_family(native) != M.machine_family(mine):
        return "this %s Python runs on a %s kernel (an emulator)" % (mine, native)
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    if M.machine_family(mine) == "arm" and ("GenuineIntel" in cpuinfo or "AuthenticAMD" in cpuinfo):
        return "this %s Python sees an x86 CPU in /proc/cpuinfo (an emulator)" % mine
    try:  # qemu-user-binfmt registers handlers only for foreign machines: one for our own says we run under it
        with open("/proc/sys/fs/binfmt_misc/qemu-" + mine) as f:
            if f.readline().strip() == "enabled":
                return "a qemu-%s handler is registered here: this machine's CPU is another one (an emulator)" % mine
    except OSError:
        pass
    return None


def record_base(card, a):
    """The parts of the result known before measuring: what is measured, and where."""
    facts = M.machine_facts()
    why = emulation()
    measurement = "emulated" if why or a.measurement == "emulated" else "measured"
    return {
        "schema": M.SCHEMA,
        "schema_version": M.SCHEMA_VERSION,
        "variant": card["variant"],
        "role": card.get("role"),
        "precision": card["precision"],
        "artifact": card["model"],
        "size_bytes": graph_bytes(existing_file(card, "model", "the model")),
        "provenance": dict(
            facts,
            measurement=measurement,
            location="device",
            device_profile=card.get("device"),
            gpu=None,
            source_run=card.get("source_run"),
            ssh_host=None,
            tool="run.py",
            created=M.now_utc(),
        ),
        "memory": {},
        "notes": ("emulated: %s; timings are the emulator's" % why) if why else "",
        "errors": [],
    }


def write(path, res):
    tmp = Path(str(path) + ".part")
    try:
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise BundleError("cannot write %s: %s" % (path, e.strerror or e)) from None


def main(argv=None):
    """Run the bundle; a bad or damaged input is one ``error:`` line on stderr and exit status 2."""
    try:
        return _main(argv)
    except BundleError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


MULTI_SCHEMA = "dsk-compress/variant-results"
"""results.json of ``--variant`` with several variants: ``{"schema", "schema_version", "device", "records", "errors"}``."""


def child_args(a, card):
    """The options of this run for one variant's own process (``--variant``, ``--out`` added by the caller)."""
    args = [
        "--runtime",
        a.runtime,
        "--warmup",
        str(a.warmup),
        "--runs",
        str(a.runs),
        "--batches",
        ",".join(map(str, a.batches)),
        "--measurement",
        a.measurement,
    ]
    for p in a.provider or ():
        args += ["--provider", p]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if a.duration is not None:
        args += ["--duration", str(a.duration)]
    if a.no_eval:
        args.append("--no-eval")
    if a.generate and (card.get("fused_model") or card.get("kv_model")):
        args += ["--generate", str(a.generate)] + (["--prompt", a.prompt] if a.prompt is not None else [])
    return args


def run_variants(cards, a):
    """Each variant in its own process of this script, one after the other; their records in one results.json. A variant
    that fails is named (stderr and the file's ``errors``) and the others are still measured; exit 0 when one was."""
    import signal
    import subprocess

    doc = {"schema": MULTI_SCHEMA, "schema_version": 1, "device": cards[0].get("device"), "records": [], "errors": []}
    part = Path(str(a.out) + ".variant.json")
    child = None

    def stop(signum, frame):  # the device's bench stops this process (or its group): stop the variant running now too
        if child is not None and child.poll() is None:
            child.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        for c in cards:
            print("variant %s (%s, %s)" % (c["variant"], c["precision"], c["model"]), flush=True)
            if a.generate and not (c.get("fused_model") or c.get("kv_model")):
                print("variant %s has no decoder graph: --generate skipped" % c["variant"], flush=True)
            try:
                part.unlink()
            except OSError:
                pass
            child = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--variant", c["variant"], "--out", str(part), *child_args(a, c)],
                cwd=str(HERE),
            )
            rc = child.wait()
            try:
                with open(str(part), encoding="utf-8") as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                rec = None
            if rc == 0 and isinstance(rec, dict):
                doc["records"].append(rec)
            else:
                doc["errors"].append(
                    "variant %s: run.py exited %s%s" % (c["variant"], rc, "" if rec is None else " (partial results dropped)")
                )
                print("error: " + doc["errors"][-1], file=sys.stderr, flush=True)
            write(a.out, doc)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait()
        try:
            part.unlink()
        except OSError:
            pass
    write(a.out, doc)
    return 0 if doc["records"] else 1


def _main(argv=None):
    card = load_card()
    a = parse_args(card, argv)
    if a.variant is not None:
        cards = variant_cards(card, a.variant)
        for c in cards:  # every variant's model is checked before any is measured
            existing_file(c, "model", "variant %s's model" % c["variant"])
        if len(cards) > 1:
            load_windows(card)
            return run_variants(cards, a)
        card = cards[0]
        if a.generate and not (card.get("fused_model") or card.get("kv_model")):
            raise BundleError("--generate needs a decoder graph, and variant %s has none (export with kv_cache: true)" % card["variant"])
    windows = load_windows(card)  # every input is checked before anything is measured or written
    existing_file(card, "model", "the model")
    codec = prompt = None
    if a.generate:
        codec = Codec(card)
        prompt = codec.encode(a.prompt) if a.prompt is not None else [int(t) for t in windows[0][: card["seq_len"] // 2]]
        if not prompt:
            raise BundleError("--prompt %r has no tokens" % a.prompt)
    res = record_base(card, a)
    providers = ort_providers(card, a.provider)
    rss_before = M.peak_rss_mb()
    t0 = time.perf_counter()
    if a.runtime == "tensorrt":
        try:
            predict, timed, info = trt_runtime(card)
        except (ImportError, Unavailable) as e:
            print("TensorRT is not usable here (%s): falling back to onnxruntime" % e)
            a.runtime = "onnxruntime"
            res["notes"] = "; ".join(x for x in (res["notes"], "TensorRT unavailable (%s): measured in onnxruntime" % e) if x)
    if a.runtime == "onnxruntime":
        predict, timed, info = ort_runtime(card, a.threads, providers)
    session_ms = (time.perf_counter() - t0) * 1000.0
    res["provenance"]["gpu"] = info.pop("gpu", None)
    res["memory"]["engine_device_memory_mb"] = info.pop("engine_device_memory_mb", None)
    res["runtime"] = info
    timing = M.time_model(timed, windows[:1].astype(np.int64), a.batches, a.warmup, a.runs, a.duration, seq_len=card["seq_len"])
    timing["session_ms"] = session_ms
    res["timing"] = timing
    res["memory"].update(peak_rss_mb=M.peak_rss_mb(), rss_before_load_mb=rss_before)
    write(a.out, res)  # partial results survive a failure below
    if not a.no_eval:
        try:
            correct, nll, count = M.score_windows(predict, windows, card["eval_batch_size"], card["logits_dtype"])
            res["accuracy"] = {
                "task": card["task"]["name"],
                "metrics": M.lm_metrics(card["task"]["name"], correct, nll, count),
                "windows": int(len(windows)),
                "tokens": int(count),
                "batch_size": card["eval_batch_size"],
            }
        except Exception as e:  # keep the timing; say what failed
            res["errors"].append("accuracy: %s: %s" % (type(e).__name__, e))
        write(a.out, res)
    del predict, timed  # one session at a time: the full-sequence graph's goes before the decoder graph's loads
    gc.collect()
    if a.generate:
        gen_providers = providers if a.runtime == "onnxruntime" else ort_providers(card, None)
        try:
            g = generate(card, a.threads, gen_providers, prompt, a.generate)
            g["text"] = codec.decode(g["tokens"]) if a.prompt is not None else None
            res["decode"] = g
        except Exception as e:
            res["errors"].append("generate: %s: %s" % (type(e).__name__, e))
        write(a.out, res)
    res["memory"]["peak_rss_mb"] = M.peak_rss_mb()
    if res["runtime"]["device"].startswith("cuda"):
        import torch

        res["memory"]["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / (1 << 20)
    write(a.out, res)
    summary = {k: res.get(k) for k in ("variant", "precision")}
    summary.update(
        runtime=res["runtime"].get("execution_provider") or res["runtime"]["name"],
        p50_ms=round(timing["batches"][0]["p50"], 3),
        accuracy=(res.get("accuracy") or {}).get("metrics"),
    )
    if res.get("decode"):
        summary["decode_tokens_per_s"] = res["decode"].get("decode_tokens_per_s")
        if res["decode"].get("text") is not None:
            print(a.prompt + res["decode"]["text"])
    print(json.dumps(summary, indent=2))
    for err in res["errors"]:
        print("error: " + err, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
