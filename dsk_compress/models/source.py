"""Resolve a recipe's model source and save / load models between stages (safetensors only)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dsk_compress.errors import ModelSourceError
from dsk_compress.models.common import count_params  # noqa: F401  (re-exported; it lives below compress/ to keep imports acyclic)
from dsk_compress.models.hf import (  # noqa: F401  (re-exported: the zoo loads through them, below this module)
    _refuse_quantized,
    check_config_fields,
    load_hf_dir,
    quiet_transformers,
    save_hf_dir,
)


def load_model_source(src: dict[str, Any]):
    """Load ``{zoo: name}``, ``{hf: dir}`` or ``{torch: "pkg.mod:factory", checkpoint: file}`` in eval mode, in
    ``src["dtype"]`` (``auto``: the checkpoint's dtype, fp32 for fp16 weights; see ``models.hf.resolve_dtype``; fp32
    when absent)."""
    dtype = src.get("dtype") or "fp32"
    if "zoo" in src:
        from dsk_compress.models.zoo import ZOO, load_zoo_model

        if src["zoo"] not in ZOO:
            raise ModelSourceError(f"unknown zoo model {src['zoo']!r}", hint=f"valid: {', '.join(ZOO.names())}")
        return load_zoo_model(src["zoo"], dtype=dtype)
    if "hf" in src:
        return load_hf_dir(src["hf"], dtype=dtype)
    if "torch" in src:
        import torch

        model = _load_torch_factory(src["torch"], src.get("checkpoint"))
        if dtype in ("bf16", "fp16"):  # a factory's module is built in fp32; auto keeps it so
            model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float16)
        return model
    raise ModelSourceError(f"bad model source {src}", hint="give one of zoo, hf, torch")


def _load_torch_factory(target: str, checkpoint: str | None):
    import torch

    from dsk_compress.io import load_state_dict
    from dsk_compress.plugins import load_target

    fn = load_target(target, "torch", ModelSourceError)
    try:
        model = fn()
    except Exception as e:  # the user's factory
        raise ModelSourceError(f"{target}() raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelSourceError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        state = load_state_dict(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelSourceError(
                f"checkpoint {checkpoint} does not fit {target}: {str(e).splitlines()[0][:200]}",
                hint="give the weights saved from this factory's model",
            ) from None
    model._dsk_source = {"torch": target}  # how save_model_dir rebuilds it
    return model.eval()


TORCH_DIR_FILE = "dsk_model.json"


def is_hf_model(model) -> bool:
    """A Hugging Face model (config + save_pretrained), as opposed to your own ``model(x) -> logits`` module."""
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def save_torch_dir(model, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save your own torch model (pruned, BatchNorm-folded or fake-quantized) as ``model.safetensors`` + ``dsk_model.json``.

    The JSON names the factory; ``extra`` may hold ``bn_folded`` pairs and ``qat`` settings. No pickle:
    ``load_torch_dir`` rebuilds the module from the factory and resizes it to the saved shapes.
    """
    from dsk_compress.io import atomic_write_json, save_state_dict

    src = getattr(model, "_dsk_source", None)
    if not src:
        raise ModelSourceError(
            f"cannot save a {type(model).__name__}: it was not loaded from a torch factory", hint="load it with load_model_source"
        )
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state_dict(model.state_dict(), tmp / "model.safetensors")
    atomic_write_json(tmp / TORCH_DIR_FILE, {"version": 1, "format": "torch-factory", **src, **(extra or {})})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_torch_dir(path: str | Path):
    """Rebuild a model saved by ``save_torch_dir``: factory, BatchNorm folding, resize to the saved shapes, fake-quant layers, weights."""
    from dsk_compress.compress.cnn import apply_folded, resize_to_state
    from dsk_compress.io import load_state_dict, read_json

    p = Path(path)
    info = read_json(p / TORCH_DIR_FILE)
    model = _load_torch_factory(info["torch"], None)
    state = load_state_dict(p / "model.safetensors")
    apply_folded(model, info.get("bn_folded", []))
    resize_to_state(model, state)
    q = info.get("qat")
    if q:
        from dsk_compress.compress.qat import prepare_qat

        prepare_qat(
            model,
            q["weight_bits"],
            q["avx2_safe"],
            q["skip"],
            activations=q.get("activations", "asymmetric"),
            shared_inputs=q.get("shared_input_quantizers"),
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelSourceError(f"cannot load {p}: {str(e).splitlines()[0][:200]}", hint="re-run the stage that wrote it") from None
    model._dsk_source = {k: info[k] for k in ("torch",)}
    return model.eval()


def save_model_dir(model, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``save_hf_dir`` for a Hugging Face model, ``save_torch_dir`` for your own torch model."""
    return save_hf_dir(model, path, extra) if is_hf_model(model) else save_torch_dir(model, path, extra)


def load_model_dir(path: str | Path):
    """Load a directory written by ``save_model_dir`` (either kind)."""
    if (Path(path) / TORCH_DIR_FILE).is_file():
        return load_torch_dir(path)
    return load_hf_dir(path)
