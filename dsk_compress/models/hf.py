"""Hugging Face checkpoints on disk: load and save a causal LM folder (safetensors only), with the installed transformers'
own weight conversion and its progress bars silenced."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsk_compress.errors import ModelSourceError


@contextmanager
def quiet_transformers():
    """Silence transformers' progress bars ("Loading weights", "Writing model shards") and its warnings for the block:
    commands promise one-line errors on stderr."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_config_fields(cfg: dict, where: str) -> None:
    """Refuse a config.json that the installed transformers would misread, with the fix.

    transformers 4 ignores transformers 5's ``rope_parameters`` (it falls back to rope_theta 10000) and its
    expert-count keys; transformers 5 reads a 4.x config (``rope_theta``, ``num_experts``) through its own conversion.
    """
    import transformers
    from packaging.version import InvalidVersion, Version

    installed = Version(transformers.__version__)
    if installed.major >= 5:
        return
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in cfg:
        raise ModelSourceError(
            f"{where}: rope_parameters (written by transformers 5) is ignored by the installed transformers "
            f"{transformers.__version__}, which would fall back to rope_theta 10000",
            hint=f"install transformers>=5 (pip install -c constraints.txt 'transformers>=5.25,<6'), or set "
            f'"rope_theta": {rope.get("rope_theta", "<value>")} in config.json',
        )
    try:
        written = Version(str(cfg.get("transformers_version") or "0"))
    except InvalidVersion:
        return
    if written.major >= 5:
        raise ModelSourceError(
            f"{where} was written by transformers {written}, whose fields the installed {transformers.__version__} "
            "misreads (rope_parameters, expert counts)",
            hint="install transformers>=5: pip install -c constraints.txt 'transformers>=5.25,<6'",
        )


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp32"}


def checkpoint_dtype(path: str | Path) -> str | None:
    """The float dtype most of a folder's safetensors weights are stored in (``bf16`` / ``fp16`` / ``fp32``), read
    from the files' headers alone (no weight is read); None when there are none."""
    counts: dict[str, int] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n < 100_000_000:
                    continue
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            continue
        for name, t in header.items():
            if name != "__metadata__" and isinstance(t, dict) and t.get("dtype") in _SAFETENSORS_DTYPES:
                shape = t.get("shape") or [1]
                size = 1
                for d in shape:
                    size *= int(d)
                key = _SAFETENSORS_DTYPES[t["dtype"]]
                counts[key] = counts.get(key, 0) + size
    if counts:
        return max(counts, key=counts.get)
    try:  # no weights (a config-only folder at --dry-run): what config.json says they are
        cfg = json.loads((Path(path) / "config.json").read_text())
        named = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    except (OSError, ValueError, AttributeError):
        return None
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(named)


def resolve_dtype(path: str | Path, want: str = "auto") -> str:
    """The dtype a teacher loads in: ``want`` when given, else (``auto``) the checkpoint's own dtype for bf16 and fp32
    weights, and fp32 for fp16 weights (CPU fp16 matmuls are slow and lose accuracy; the code-lm zoo teacher is stored
    in fp16 and has always computed in fp32)."""
    if want != "auto":
        return want
    stored = checkpoint_dtype(path)
    return "bf16" if stored == "bf16" else "fp32"


def load_hf_dir(path: str | Path, config=None, dtype: str = "fp32"):
    """Load a local Hugging Face causal LM directory from safetensors weights (no remote code).

    The weights go through transformers' ``from_pretrained`` and so its own key conversion (a transformers 4
    MoE checkpoint with per-expert keys loads into transformers 5's fused experts). ``config`` overrides the
    directory's config.json. ``dtype`` (``fp32`` / ``bf16`` / ``fp16``, or ``auto``: :func:`resolve_dtype`) is the
    dtype the weights are materialised in, shard by shard (no fp32 copy of a bf16 checkpoint is ever made).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, DTYPES[resolve_dtype(path, dtype)])

    p = Path(path)
    if config is None:
        if not (p / "config.json").is_file():
            raise ModelSourceError(
                f"no Hugging Face model at {p} (config.json missing)", hint="point to a directory saved with save_pretrained"
            )
        _refuse_quantized(p)
        _check_config_shape(p)
    try:
        with quiet_transformers():
            cfg = config if config is not None else AutoConfig.from_pretrained(p, trust_remote_code=False, local_files_only=True)
            model, info = AutoModelForCausalLM.from_pretrained(
                p,
                config=cfg,
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                attn_implementation="eager",
                dtype=torch_dtype,
                output_loading_info=True,
            )
    except Exception as e:  # transformers / safetensors raise OSError, ValueError, SafetensorError, ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelSourceError(
            f"cannot load the model in {p}: {first}", hint="the directory needs config.json and valid *.safetensors weights"
        ) from None
    # transformers only warns and initialises missing tensors at random: a model that is partly noise is refused
    missing = [k for k in info.get("missing_keys") or [] if not k.endswith("inv_freq")]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        bad, what = (missing, "lack") if missing else (mismatched, "have other shapes than config.json gives for")
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ModelSourceError(
            f"the weights in {p} {what} {len(bad)} tensor(s) of its config: {shown}",
            hint="the safetensors files are incomplete or belong to another model; re-save it with save_pretrained",
        )
    return model.eval()


def _check_config_shape(p: Path) -> None:
    """A config whose attention cannot be built (hidden size vs heads vs KV heads) is refused before transformers tries."""
    from dsk_compress.models.shapes import check_attention_shape

    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers reports an unreadable config
    if isinstance(cfg, dict):
        check_attention_shape(cfg, f"{p / 'config.json'}", ModelSourceError)
        check_config_fields(cfg, f"{p / 'config.json'}")


def _refuse_quantized(p: Path) -> None:
    """Distillation copies and merges float weights; a quantized checkpoint (e.g. DeepSeek-V3's FP8) must be dequantized first."""
    try:
        qc = json.loads((p / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return  # transformers reports an unreadable config below
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ModelSourceError(
            f"the model in {p} is quantized (config.json quantization_config.quant_method={method})",
            hint="dequantize it to bf16/fp32 safetensors (e.g. DeepSeek-V3's fp8_cast_bf16.py) and point to that directory",
        )


def save_hf_dir(model, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a model with ``save_pretrained`` (safetensors) into ``path`` atomically (temp dir + rename)."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
    if extra:
        (tmp / "dsk_compress.json").write_text(json.dumps(extra, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
