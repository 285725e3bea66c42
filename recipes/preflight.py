"""Checks of a validated recipe against the files it names and the machine it runs on, before any work.

The schema checks each value's range; this checks what needs the files and the machine, reading only
small files (``config.json``, never weights), so ``--dry-run`` stays fast:

* model sources: a zoo name that exists, an ``hf:`` folder with a ``config.json`` whose attention shape
  works (hidden size divisible by the heads, heads by the KV heads), that is not quantized and that
  transformers reads (a known ``model_type``), a torch ``checkpoint`` that exists;
* for a student cut from the teacher: a supported architecture, routed experts enough for its top-k, and the
  student's layers (in range, none twice); the teacher's vocabulary against the student's and the task's;
  ``logit_cache.top_k`` against the teacher's vocabulary; a ``text-lm`` task's files and tokenizer folder;

Each of these is the very check the run makes when it loads the models (``models.hf``, ``compress.student``,
``compress.distill.check_vocab``), called here on the config alone, so ``--dry-run`` refuses what the run would.
* memory: an estimate of the largest stage (weights, gradients and AdamW state of the student, the
  teacher's weights, activations ~ batch x seq x hidden x layers, logits batch x seq x vocab, the
  validation windows) against this machine's memory; a recipe that cannot fit is refused with both
  numbers instead of running out of memory hours later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dsk_compress.errors import RecipeError
from dsk_compress.models.shapes import check_attention_shape

FLOAT_BYTES = 4
ADAMW_COPIES = 4
"""Weights, gradients and AdamW's two moments, each fp32, per trained parameter."""
ACTIVATIONS_PER_HIDDEN = 16
"""fp32 values kept for the backward pass per token, layer and hidden unit (norms, q/k/v/o, residuals)."""
LOGIT_COPIES = 6
"""Student logits, their gradient, log-softmax, teacher logits and softmax, KD term: per token and vocabulary entry."""
MEMORY_FRACTION = 0.9
"""Share of this machine's memory a recipe may plan to use."""
TORCH_ONNX_EXPORT_PEAK = 6.3
"""Peak of exporting one fp32 graph (``torch.onnx.export``, then its check against torch in an ONNX Runtime session while
the torch model is still resident) over the model's fp32 weight bytes. Measured 2026-12-07 on this 2-core machine:
``benchmarks/scale.py --scale 0.5`` (a 332M Qwen3-MoE teacher, 1.24 GiB fp32) peaked at 8.37 GiB in export, 7.8 GiB
above the process; ``torch.onnx.export`` alone of the 1.16B teacher's 4.65 GB was near 14 GiB (3.2x, STACK.md)."""
TRAINING_EXTRA = {"distill": 1, "prune": 2, "qat": 4}
"""Extra fp32 copies of the student a training stage holds beside its weights, gradients and AdamW state (the cut and
expert merge; the pruning graph; QAT's fake-quant model and frozen copy), measured on the same scale run: distill
4.64, prune 3.97, qat 4.99 GiB for a 132M student."""
BENCH_SESSION_PEAK = 4.4
"""Peak of the bench stage over the bytes of the largest fp32 graph it runs in ONNX Runtime (the same scale run: 6.12 GiB
with the 1.24 GiB teacher graph, dense routing)."""
ONNXSLIM_PEAK = 4.1
"""Peak of onnxslim over the graph's bytes (9.4 GB for a 2.29 GB graph, STACK.md); graphs past
``export.graph_files.SLIM_MAX_BYTES`` of weights skip it."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PROCESS_BASE_BYTES = int(0.6 * 1024**3)
"""Resident before any model: Python, torch, transformers, onnxruntime (benchmarks/scale.py --scale 0.05 with a 2M-parameter
teacher peaked at 0.63-0.85 GiB per stage, 2026-12-07, this 2-core machine)."""
TEACHER_ONNX_FRACTION = 0.5
"""Share of this machine's memory ``export.teacher: auto`` lets the teacher's fp32 ONNX export peak at: that graph is a
reference row, not what ships, so it does not get to take the machine (a 1.16B teacher's ~14 GiB export on 24 GiB
goes to ``torch``)."""

GIB = 1024**3


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or a lower cgroup limit (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


def _read_config(path: Path, field: str) -> dict:
    if not (path / "config.json").is_file():
        raise RecipeError(
            f"{field}: no Hugging Face model at {path} (config.json missing)", hint="point to a directory saved with save_pretrained"
        )
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"{field}: cannot read {path / 'config.json'}: {str(e).splitlines()[0][:120]}", hint="give a valid config.json"
        ) from None
    if not isinstance(cfg, dict):
        raise RecipeError(f"{field}: {path / 'config.json'} is not a JSON object")
    return cfg


def source_config(src, field: str) -> dict | None:
    """The Hugging Face config (a dict) of a ``zoo`` / ``hf`` source, checked; None for a torch factory (whose
    ``checkpoint`` must exist)."""
    if getattr(src, "zoo", None):
        from dsk_compress.models.zoo import ZOO

        if src.zoo not in ZOO:
            raise RecipeError(f"{field}.zoo: unknown zoo model {src.zoo!r}", hint=f"valid: {', '.join(ZOO.names())}")
        spec = ZOO.get(src.zoo)
        return {"model_type": spec.model_type, **spec.config}
    if getattr(src, "hf", None):
        cfg = _read_config(Path(src.hf), f"{field}.hf")
        check_attention_shape(cfg, f"{field}.hf ({src.hf})")
        _loader_checks(Path(src.hf), cfg, f"{field}.hf")
        return cfg
    ckpt = getattr(src, "checkpoint", None)
    if ckpt is not None and not Path(ckpt).is_file():
        raise RecipeError(f"{field}.checkpoint: {ckpt} does not exist", hint="give the path of the model's .safetensors weights")
    return None


def _loader_checks(path: Path, cfg: dict, field: str) -> None:
    """What loading the folder refuses before it reads any weight (``models.hf``: a quantized checkpoint, config fields the
    installed transformers would misread), called here and said naming the recipe field."""
    from dsk_compress.errors import DskError
    from dsk_compress.models.hf import _refuse_quantized, check_config_fields

    try:
        _refuse_quantized(path)
        check_config_fields(cfg, str(path / "config.json"))
    except DskError as e:
        raise RecipeError(f"{field}: {e.message}", hint=e.hint) from None


def hf_config(src, field: str):
    """The transformers config object of a ``zoo`` / ``hf`` source, read as the run reads it (``AutoConfig``, no remote
    code; an ``hf:`` folder whose ``model_type`` is missing or unknown is refused); None for a torch factory."""
    if getattr(src, "zoo", None):
        from transformers import CONFIG_MAPPING

        cfg = dict(source_config(src, field))
        return CONFIG_MAPPING[cfg.pop("model_type")](**cfg)
    if not getattr(src, "hf", None):
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.hf, trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises ValueError / KeyError / OSError for a config it cannot read
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise RecipeError(
            f"{field}.hf: transformers cannot read {Path(src.hf) / 'config.json'}: {first}",
            hint="give the directory save_pretrained wrote (config.json with its model_type)",
        ) from None


def check_cut(spec, tconf) -> list[int]:
    """A student cut from the teacher (``student.from_teacher``): the teacher's architecture is supported, its MoE layers
    have routed experts enough for their top-k, and the layers kept are in range and distinct (the run's own checks:
    ``compress.moe.family``, ``compress.student.select_layers``). Returns the kept layers."""
    from dsk_compress.compress.moe import family
    from dsk_compress.compress.student import select_layers

    fam = family(tconf)
    n = int(getattr(tconf, "num_hidden_layers", 0) or 0)
    if n < 1:
        raise RecipeError(f"teacher: num_hidden_layers is {n}", hint="the teacher's config.json needs at least one layer")
    if any(fam.sparse(tconf, i) for i in range(n)):
        key = next((k for k in ("num_local_experts", "num_experts", "n_routed_experts") if getattr(tconf, k, None) is not None), None)
        count, top_k = (getattr(tconf, key) if key else None), getattr(tconf, "num_experts_per_tok", 1) or 1
        if key is not None and (not isinstance(count, int) or count < max(1, top_k)):
            raise RecipeError(
                f"teacher: config.json {key} is {count!r}, but its MoE layers route each token to num_experts_per_tok={top_k} experts",
                hint="fix the teacher's config.json (or give another teacher)",
            )
    ft = spec.student.from_teacher
    return select_layers(n, ft.layers, ft.keep_every)


def task_vocab(spec) -> int | None:
    """The task's vocabulary as the run builds it: code-lm's bytes, a text-lm tokenizer's length; None for a user's task."""
    name = getattr(spec.task, "name", None)
    if name == "code-lm":
        from dsk_compress.tasks.code_lm import CodeLMTask

        return int(CodeLMTask.vocab_size)
    if name == "text-lm":
        from dsk_compress.tasks.text_lm import load_tokenizer

        return len(load_tokenizer(spec.task.tokenizer))
    return None


def _int(cfg: dict, *keys: str, default: int = 0) -> int:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def _shape(cfg: dict) -> dict[str, int]:
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _int(cfg, "num_attention_heads", "n_head", default=1)
    kv = _int(cfg, "num_key_value_heads", default=heads)
    experts = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    expert_width = _int(cfg, "moe_intermediate_size", "intermediate_size") if experts else 0
    shared = _int(cfg, "shared_expert_intermediate_size") or _int(cfg, "n_shared_experts") * _int(cfg, "moe_intermediate_size")
    return {
        "vocab": _int(cfg, "vocab_size"),
        "hidden": hidden,
        "layers": _int(cfg, "num_hidden_layers", "n_layer"),
        "heads": heads,
        "kv": kv,
        "head_dim": _int(cfg, "head_dim", default=hidden // heads if heads else 0),
        "ffn": _int(cfg, "intermediate_size"),
        "experts": experts,
        "expert_width": expert_width,
        "shared": shared,
        "tied": bool(cfg.get("tie_word_embeddings", False)),
    }


def estimate_params(s: dict[str, int]) -> int:
    """Parameters of a decoder-only LM of shape ``s`` (attention, FFN or experts, embeddings; norms and biases left out)."""
    h, hd = s["hidden"], s["head_dim"]
    attn = h * s["heads"] * hd * 2 + h * s["kv"] * hd * 2
    if s["experts"]:
        ffn = s["experts"] * 3 * h * s["expert_width"] + h * s["experts"] + 3 * h * s["shared"]
    else:
        ffn = 3 * h * s["ffn"]
    return s["layers"] * (attn + ffn) + s["vocab"] * h * (1 if s["tied"] else 2)


def _student_shape(spec, teacher: dict[str, int] | None, student_cfg: dict | None) -> dict[str, int] | None:
    ft = spec.student.from_teacher
    if ft is None:
        return _shape(student_cfg) if student_cfg else None
    if teacher is None:
        return None
    n = teacher["layers"]
    if n:
        from dsk_compress.compress.student import select_layers

        kept = len(select_layers(n, ft.layers, ft.keep_every))  # out of range or twice: the run's own refusal
    else:
        kept = 0
    width = ft.intermediate_size or teacher["expert_width"] or teacher["ffn"]
    return {**teacher, "layers": kept, "ffn": width, "experts": 0, "expert_width": 0, "shared": 0}


def _seq_len(spec) -> int | None:
    return getattr(spec.task, "seq_len", None)


def teacher_dtype(spec) -> str:
    """The dtype the run loads the teacher in (``teacher.dtype``; auto read from the checkpoint's headers)."""
    from dsk_compress.models.hf import resolve_dtype

    want = getattr(spec.teacher, "dtype", "auto")
    if getattr(spec.teacher, "hf", None):
        return resolve_dtype(spec.teacher.hf, want)
    if getattr(spec.teacher, "zoo", None):
        from dsk_compress.models.zoo import zoo_path

        return resolve_dtype(zoo_path(spec.teacher.zoo), want)
    return "fp32" if want == "auto" else want


def _teacher_params(spec) -> int | None:
    try:
        tcfg = source_config(spec.teacher, "teacher")
    except RecipeError:
        return None
    return estimate_params(_shape(tcfg)) if tcfg else None


def onnx_export_peak(params: int) -> int:
    """Modelled peak bytes of exporting a model of ``params`` parameters to an fp32 ONNX graph: ``torch.onnx.export``
    (:data:`TORCH_ONNX_EXPORT_PEAK` x its fp32 bytes), or for a graph small enough to slim, the resident model plus
    onnxslim (:data:`ONNXSLIM_PEAK` x the graph)."""
    from dsk_compress.export.graph_files import SLIM_MAX_BYTES

    fp32 = params * FLOAT_BYTES
    slim = fp32 * (1 + ONNXSLIM_PEAK) if fp32 <= SLIM_MAX_BYTES else 0
    return int(max(TORCH_ONNX_EXPORT_PEAK * fp32, slim))


def teacher_export_plan(spec, memory: int | None = None) -> tuple[str, str]:
    """What ``export.teacher: auto`` does: ``onnx`` when the fp32 export's modelled peak (:func:`onnx_export_peak`) fits
    :data:`MEMORY_FRACTION` of this machine's memory, else ``torch`` (the teacher in its dtype, measured eagerly) when
    that fits, else ``skip``; with the reason in words."""
    mem = memory if memory is not None else machine_memory()
    budget = MEMORY_FRACTION * mem
    params = _teacher_params(spec)
    if params is None:
        return "onnx", "the teacher's size is known only when it is loaded"
    peak = onnx_export_peak(params)
    if peak <= TEACHER_ONNX_FRACTION * mem:
        return "onnx", f"its fp32 ONNX export peaks near {_gib(peak)}, within half of this machine's {_gib(mem)}"
    resident = params * DTYPE_BYTES[teacher_dtype(spec)]
    if resident <= budget:
        return "torch", (
            f"its fp32 ONNX export would peak near {_gib(peak)}, more than half of this machine's {_gib(mem)}; "
            f"PyTorch eager in {teacher_dtype(spec)} holds {_gib(resident)}"
        )
    return "skip", f"neither its fp32 ONNX export ({_gib(peak)}) nor its {teacher_dtype(spec)} weights ({_gib(resident)}) fit {_gib(mem)}"


def estimate_memory(spec, teacher: dict[str, int] | None, student: dict[str, int] | None) -> dict[str, Any] | None:
    """The largest stage's memory need in bytes, with what it is made of (None when the shapes are unknown)."""
    seq = _seq_len(spec)
    if student is None or seq is None:
        return None
    from dsk_compress.recipes.base import STAGES

    ps = estimate_params(student)
    pt = estimate_params(teacher) if teacher else 0
    tdt = teacher_dtype(spec) if teacher else "fp32"
    t_bytes = pt * DTYPE_BYTES[tdt]
    vocab = max(student["vocab"], teacher["vocab"] if teacher else 0)
    worst: dict[str, Any] | None = None
    stages: list[dict[str, Any]] = []
    for i, st in enumerate(spec.stages):
        b = st.batch_size if hasattr(st, "batch_size") else 1
        # the run releases the teacher before a stage that does not run it (recipes.runner)
        holds_teacher = STAGES.get(st.stage)(st).uses_teacher(spec)
        field = f"stages.{i}.batch_size"
        if st.stage in ("distill", "prune", "qat"):
            acts = (
                b
                * seq
                * student["layers"]
                * (ACTIVATIONS_PER_HIDDEN * student["hidden"] + 4 * student["ffn"] + 3 * student["heads"] * seq)
                * FLOAT_BYTES
            )
            logits = b * seq * vocab * LOGIT_COPIES * FLOAT_BYTES
            parts = {
                "student weights + grads + AdamW": ps * ADAMW_COPIES * FLOAT_BYTES,
                "student copies (cut, pruning graph, fake-quant)": TRAINING_EXTRA[st.stage] * ps * FLOAT_BYTES,
                f"teacher weights ({tdt})": t_bytes if holds_teacher else 0,
                "activations": acts,
                "logits": logits,
            }
            if st.stage == "distill" and teacher:  # the logit cache's weight hash and the expert merge: one more teacher
                parts["teacher load, hash and expert merge"] = t_bytes
            if holds_teacher and teacher:
                parts["teacher activations"] = b * seq * teacher["hidden"] * 8 * FLOAT_BYTES * DTYPE_BYTES[tdt] // FLOAT_BYTES
            if st.stage == "distill" and teacher and spec.logit_cache.enabled and getattr(st, "hidden_mse", 0) == 0:
                # the teacher's pass fills the logit cache, then it is released (recipes.stages.common.fill_logit_cache):
                # the cut and the training are two phases, and the stage peaks at the larger one
                cut = {k: parts[k] for k in parts if k.startswith("teacher")} | {"student being cut (two copies)": 2 * ps * FLOAT_BYTES}
                train = {k: v for k, v in parts.items() if not k.startswith("teacher")}
                parts = cut if sum(cut.values()) > sum(train.values()) else train
        elif st.stage == "export":
            how = STAGES.get(st.stage)(st).effective_config(spec).teacher if teacher else "skip"
            # the teacher's step and the students' steps run one after the other (the teacher is released in between)
            teacher_step = onnx_export_peak(pt) if how == "onnx" else t_bytes if how == "torch" else 0
            student_step = ps * FLOAT_BYTES + onnx_export_peak(ps)  # one more student model (e.g. the QAT one) beside the export
            parts = (
                {"teacher fp32 ONNX export (torch.onnx / onnxslim peak)": teacher_step}
                if teacher_step >= student_step
                else {"student ONNX export (torch.onnx / onnxslim peak)": onnx_export_peak(ps), "second student model": ps * FLOAT_BYTES}
            )
            field = f"stages.{i}.teacher" if teacher_step >= student_step else "student"
        elif st.stage == "bench":
            how = (
                next((STAGES.get(e.stage)(e).effective_config(spec).teacher for e in spec.stages if e.stage == "export"), "skip")
                if teacher
                else "skip"
            )
            graph = max(ps, pt if how == "onnx" else 0) * FLOAT_BYTES
            io = {
                "logits": b * seq * vocab * 2 * FLOAT_BYTES,
                "activations": b * seq * max(student["hidden"], teacher["hidden"] if teacher else 0) * 8 * FLOAT_BYTES,
            }
            # each variant is measured in its own worker process, one at a time: the torch teacher's and the largest
            # graph's are two phases, and the stage peaks at the larger one
            parts = {"largest graph in ONNX Runtime": int(BENCH_SESSION_PEAK * graph), **io}
            if how == "torch" and t_bytes > parts["largest graph in ONNX Runtime"]:
                parts = {"torch teacher": t_bytes, **io}
        else:
            continue
        parts["python, torch and libraries"] = PROCESS_BASE_BYTES
        total = sum(parts.values())
        stages.append({"index": i, "stage": st.stage, "bytes": total})
        if worst is None or total > worst["bytes"]:
            worst = {
                "stage": f"stages.{i} ({st.stage}" + (f", batch_size {b})" if hasattr(st, "batch_size") else ")"),
                "bytes": total,
                "parts": parts,
                "field": field,
            }
    windows = getattr(spec.task, "eval_sequences", 0) * seq * 8  # int64 validation windows
    if worst is None or windows > worst["bytes"]:
        worst = {
            "stage": f"task (eval_sequences {spec.task.eval_sequences})",
            "bytes": windows,
            "parts": {"validation windows": windows},
            "field": "task.eval_sequences",
        }
    worst["student_params"], worst["teacher_params"], worst["teacher_dtype"] = ps, pt, tdt
    worst["stages"] = stages
    return worst


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.0f} MiB"


def preflight(spec) -> dict[str, Any]:
    """Check ``spec`` against its files and this machine; return what was estimated (for ``--dry-run``).

    Raises:
        RecipeError: a model source, task file or tokenizer folder that is missing or unusable, a student layer the
            teacher lacks, ``logit_cache.top_k`` above the vocabulary, or a memory need above this machine's.
    """
    from dsk_compress.errors import InvalidArgument
    from dsk_compress.recipes.base import field_error

    try:
        return _checks(spec)
    except InvalidArgument as e:  # the run's own library checks, said naming the recipe field
        raise field_error(e) from None


def _checks(spec) -> dict[str, Any]:
    tcfg = source_config(spec.teacher, "teacher")
    scfg = None
    if spec.student.from_teacher is None:
        scfg = source_config(spec.student, "student")
    tconf = hf_config(spec.teacher, "teacher") if tcfg else None
    sconf = hf_config(spec.student, "student") if scfg else None
    if tconf is not None and spec.student.from_teacher is not None:
        check_cut(spec, tconf)
    teacher = _shape(tcfg) if tcfg else None
    if spec.logit_cache.enabled and teacher and teacher["vocab"] and spec.logit_cache.top_k > teacher["vocab"]:
        raise RecipeError(
            f"logit_cache.top_k {spec.logit_cache.top_k} is more than the teacher's vocabulary ({teacher['vocab']} tokens)",
            hint=f"set logit_cache.top_k to at most {teacher['vocab']}",
        )
    if getattr(spec.task, "name", None) == "text-lm":
        for key in ("train", "eval"):
            for f in getattr(spec.task, key):
                if not Path(f).is_file():
                    raise RecipeError(f"task.{key}: {f} does not exist", hint="give existing .txt, .jsonl or .json files")
        if not Path(spec.task.tokenizer).is_dir():
            raise RecipeError(f"task.tokenizer: {spec.task.tokenizer} is not a folder", hint="give the teacher's local directory")
    if tconf is not None and any(st.stage == "distill" for st in spec.stages):
        from dsk_compress.compress.distill import check_vocab

        check_vocab(tconf, sconf)  # student against teacher (a student cut from the teacher has its vocabulary)
        check_vocab(tconf, task_vocab=task_vocab(spec))  # the task's tokens against the teacher's embedding rows
    _check_bench_devices(spec)
    student = _student_shape(spec, teacher, scfg)
    est = estimate_memory(spec, teacher, student)
    notes = []
    if tcfg and spec.student.from_teacher is not None:
        from dsk_compress.compress.moe import student_notes

        notes = student_notes(tcfg)  # what the student cut and the exports cannot do for this family, said before any work
    if est is None:
        return {"student_notes": notes} if notes else {}
    est["student_notes"] = notes
    mem = machine_memory()
    est["machine_bytes"] = mem
    if est["bytes"] > MEMORY_FRACTION * mem:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in est["parts"].items() if v)
        raise RecipeError(
            f"{est['stage']} needs about {_gib(est['bytes'])} ({parts}) but this machine has {_gib(mem)} of memory",
            hint=_memory_hint(spec, est, mem),
        )
    return est


def _memory_hint(spec, est: dict[str, Any], mem: int) -> str:
    """The fix for a recipe that does not fit: when the teacher's weights alone are most of it, a smaller batch cannot help,
    so say what does (its dtype, the logit cache, a GPU or several with FSDP), with the numbers."""
    pt, tdt = est.get("teacher_params", 0), est.get("teacher_dtype", "fp32")
    teacher_part = max((v for k, v in est["parts"].items() if k.startswith("teacher")), default=0)
    if teacher_part * 2 < est["bytes"] and teacher_part < MEMORY_FRACTION * mem / 2:
        return f"lower {est['field']}, task.seq_len or the student's size (student.from_teacher.intermediate_size, layers)"
    bf16 = pt * 2
    fixes = []
    if tdt == "fp32":
        fixes.append(f"set teacher.dtype: bf16 (its weights {_gib(pt * 4)} -> {_gib(bf16)})")
    if not spec.logit_cache.enabled:
        fixes.append("enable logit_cache (the teacher then runs once per batch, in distill only, and is released after it)")
    gpus = max(1, -(-int(bf16 * 1.15) // int(80 * GIB)))
    fixes.append(
        f"run the distill stage on GPUs holding the {_gib(bf16)} bf16 teacher: "
        + ("one 80 GB GPU" if gpus == 1 else f"{gpus}+ 80 GB GPUs under torchrun with distributed.teacher: fsdp")
    )
    if bf16 > MEMORY_FRACTION * mem:
        fixes.append(f"on this machine ({_gib(mem)}) a teacher of {pt / 1e9:.1f}B parameters does not fit even in bf16")
    return "; ".join(fixes)


def _check_bench_devices(spec) -> None:
    """A bench stage measures this machine: a device profile of another CPU architecture is refused before any training."""
    from dsk_compress.devices import load_device
    from dsk_compress.errors import DeviceError
    from dsk_compress.recipes.stages.bench import check_profile_fits_host

    for i, st in enumerate(spec.stages):
        if st.stage == "bench":
            try:
                check_profile_fits_host(load_device(st.device))
            except DeviceError as e:
                raise RecipeError(f"stages.{i}.device: {e.message}", hint=e.hint) from None


def describe_estimate(est: dict[str, Any]) -> str:
    """One line for ``--dry-run``: the largest stage's memory estimate and this machine's memory (then one line per note on
    what the student cut cannot do for the teacher's family)."""
    notes = "".join(f"\nnote: {n}" for n in (est or {}).get("student_notes", []))
    if not est or "bytes" not in est:
        return "memory: not estimated (the model's shape is known only when it is loaded)" + notes
    return (
        f"memory: about {_gib(est['bytes'])} at most, in {est['stage']} (student ~{est['student_params'] / 1e6:.1f}M params, "
        f"teacher ~{est['teacher_params'] / 1e6:.1f}M); this machine has {_gib(est['machine_bytes'])}"
    ) + notes


__all__ = ["preflight", "describe_estimate", "estimate_memory", "estimate_params", "check_attention_shape", "machine_memory"]
