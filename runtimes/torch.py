"""Eager PyTorch on CPU, for model variants that cannot be exported to ONNX.

The model is a Hugging Face model directory (``config.json`` + ``*.safetensors``) loaded with
``from_pretrained(dir, use_safetensors=True)``; no remote code is ever executed.
``torch`` and ``transformers`` are imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dsk_compress.runtimes.base import BenchConfig, BenchResult, RuntimeBackendError, run_worker

RUNTIME_NAME = "torch-eager-cpu"
DTYPES = ("float32", "bfloat16", "float16")


def load_hf_model(model_dir: str | os.PathLike, dtype: str = "float32"):
    """Load a saved Hugging Face model directory in ``dtype`` on CPU, in eval mode.

    Tries ``AutoModelForCausalLM`` first, then ``AutoModel`` for configs that are not causal LMs.
    """
    try:
        import torch
        import transformers
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError as e:
        raise RuntimeBackendError(f"eager torch runtime unavailable: {e}", hint="reinstall dsk-compress; torch and transformers are core dependencies") from None
    from packaging.version import Version

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RuntimeBackendError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    if dtype not in DTYPES:
        raise RuntimeBackendError(f"unknown torch dtype {dtype!r}", hint=f"valid: {', '.join(DTYPES)}")
    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs = {"use_safetensors": True, dtype_kw: getattr(torch, dtype)}
    errors = []
    for cls in (AutoModelForCausalLM, AutoModel):
        try:
            model = cls.from_pretrained(str(model_dir), **kwargs)
            break
        except ValueError as e:  # config class not mapped to this auto class
            errors.append(f"{cls.__name__}: {e}")
        except OSError as e:  # missing/corrupt weights
            raise RuntimeBackendError(f"cannot load {model_dir}: {e}") from None
    else:
        raise RuntimeBackendError(f"cannot load {model_dir} with transformers: {' | '.join(errors)}")
    model.eval()
    return model


def torch_forward(model) -> Callable[[np.ndarray], np.ndarray]:
    """A ``predict(x) -> np.ndarray``: integer inputs go in as ``input_ids``, others positionally;
    returns ``logits`` (or the first output) as float32 numpy."""
    import torch

    use_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}

    @torch.inference_mode()
    def predict(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x))
        out = model(input_ids=t, **use_cache) if not t.is_floating_point() else model(t)
        y = getattr(out, "logits", None)
        if y is None:
            y = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
        return y.float().numpy()

    return predict


def benchmark_torch(
    model_dir: str | os.PathLike,
    inputs: np.ndarray,
    cfg: BenchConfig | None = None,
    dtype: str = "float32",
) -> BenchResult:
    """Time a saved Hugging Face model in eager PyTorch on CPU, in a fresh worker process."""
    cfg = cfg or BenchConfig()
    if dtype not in DTYPES:
        raise RuntimeBackendError(f"unknown torch dtype {dtype!r}", hint=f"valid: {', '.join(DTYPES)}")
    if not (Path(model_dir) / "config.json").is_file():
        raise RuntimeBackendError(f"not a Hugging Face model directory (no config.json): {model_dir}", hint="save it with save_pretrained()")
    return run_worker("torch", model_dir, inputs, cfg, extra_args=["--dtype", dtype])
