"""Resolve a recipe's model source and save / load models between stages (safetensors only)."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from dsk_compress.errors import ModelSourceError


def load_model_source(src: dict[str, Any]):
    """Load ``{zoo: name}``, ``{hf: dir}`` or ``{torch: "pkg.mod:factory", checkpoint: file}`` in eval mode."""
    if "zoo" in src:
        from dsk_compress.models.zoo import ZOO, load_zoo_model

        if src["zoo"] not in ZOO:
            raise ModelSourceError(f"unknown zoo model {src['zoo']!r}", hint=f"valid: {', '.join(ZOO.names())}")
        return load_zoo_model(src["zoo"])
    if "hf" in src:
        return load_hf_dir(src["hf"])
    if "torch" in src:
        return _load_torch_factory(src["torch"], src.get("checkpoint"))
    raise ModelSourceError(f"bad model source {src}", hint="give one of zoo, hf, torch")


def load_hf_dir(path: str | Path):
    """Load a local Hugging Face causal LM directory from safetensors weights (no remote code)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelSourceError(f"no Hugging Face model at {p} (config.json missing)", hint="point to a directory saved with save_pretrained")
    _refuse_quantized(p)
    try:
        cfg = AutoConfig.from_pretrained(p, trust_remote_code=False, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            p, config=cfg, use_safetensors=True, trust_remote_code=False, local_files_only=True,
            attn_implementation="eager", dtype=torch.float32,
        )
    except Exception as e:  # transformers / safetensors raise OSError, ValueError, SafetensorError, ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelSourceError(f"cannot load the model in {p}: {first}", hint="the directory needs config.json and valid *.safetensors weights") from None
    return model.eval()


def _refuse_quantized(p: Path) -> None:
    """Distillation copies and merges float weights; a quantized checkpoint (e.g. DeepSeek-V3's FP8) must be dequantized first."""
    try:
        qc = json.loads((p / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return  # transformers reports an unreadable config below
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ModelSourceError(f"the model in {p} is quantized (config.json quantization_config.quant_method={method})",
                               hint="dequantize it to bf16/fp32 safetensors (e.g. DeepSeek-V3's fp8_cast_bf16.py) and point to that directory")


def save_hf_dir(model, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a model with ``save_pretrained`` (safetensors) into ``path`` atomically (temp dir + rename)."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if extra:
        (tmp / "dsk_compress.json").write_text(json.dumps(extra, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _load_torch_factory(target: str, checkpoint: str | None):
    import torch

    from dsk_compress.io import load_state_dict

    mod_name, _, fn_name = target.partition(":")
    if not fn_name:
        raise ModelSourceError(f"bad torch source {target!r}", hint="use 'package.module:factory'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelSourceError(f"cannot import {target!r}: {e}", hint="check the module path and that it is importable") from None
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise ModelSourceError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        model.load_state_dict(load_state_dict(checkpoint))
    return model.eval()


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))
