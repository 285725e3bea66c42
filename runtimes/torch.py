"""PyTorch runtimes: eager or ``torch.compile``, on the CPU (variants that cannot be exported to ONNX) or on
CUDA in bfloat16 / float16 (GPU servers).

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

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


def load_hf_model(model_dir: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """Load a saved Hugging Face model directory in ``dtype`` on ``device`` (cpu or cuda), in eval mode.

    Tries ``AutoModelForCausalLM`` first, then ``AutoModel`` for configs that are not causal LMs.
    """
    try:
        import torch
        import transformers
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError as e:
        raise RuntimeBackendError(
            f"eager torch runtime unavailable: {e}", hint="reinstall dsk-compress; torch and transformers are core dependencies"
        ) from None
    from packaging.version import Version

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RuntimeBackendError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    _check(dtype, device)
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
    return model.to(device)


def _check(dtype: str, device: str) -> None:
    if dtype not in DTYPES:
        raise RuntimeBackendError(f"unknown torch dtype {dtype!r}", hint=f"valid: {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise RuntimeBackendError(f"unknown torch device {device!r}", hint=f"valid: {', '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeBackendError(
                "the torch CUDA runtime needs a CUDA GPU, but torch.cuda.is_available() is False",
                hint="run on a machine with an NVIDIA GPU and a CUDA build of torch",
            )


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


def gpu_resident(fn: Callable, device) -> Callable[[np.ndarray], object]:
    """``predict(x)`` that copies each distinct input batch to ``device`` once, calls ``fn`` on the GPU tensor and
    synchronises: a timed run measures the model on the GPU, not the host-to-device copy (as trtexec's GPU time)."""
    import torch

    held: dict = {}

    def predict(x: np.ndarray):
        if held.get("key") != (id(x), x.shape):  # time_model keeps its batch alive while it times it
            held.update(key=(id(x), x.shape), t=torch.from_numpy(np.ascontiguousarray(x)).to(device))
        y = fn(held["t"])
        torch.cuda.synchronize(device)
        return y

    return predict


def torch_device_forward(model, device: str = "cpu", compile: bool = False) -> Callable[[np.ndarray], object]:
    """What the bench worker times: on the CPU :func:`torch_forward` (numpy out); on CUDA the logits stay on the
    GPU (see :func:`gpu_resident`). ``compile``: ``torch.compile`` the model first (compiled on the first call)."""
    import torch

    if compile:
        model = torch.compile(model)
    if device == "cpu":
        return torch_forward(model)
    use_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}

    @torch.inference_mode()
    def logits(t):
        out = model(input_ids=t, **use_cache) if not t.is_floating_point() else model(t)
        return getattr(out, "logits", out)

    return gpu_resident(logits, next(model.parameters()).device)


def benchmark_torch(
    model_dir: str | os.PathLike,
    inputs: np.ndarray,
    cfg: BenchConfig | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    compile: bool = False,
) -> BenchResult:
    """Time a saved Hugging Face model in PyTorch (eager or ``compile``, cpu or cuda, ``dtype``) in a fresh worker process."""
    cfg = cfg or BenchConfig()
    _check(dtype, device)
    if not (Path(model_dir) / "config.json").is_file():
        raise RuntimeBackendError(
            f"not a Hugging Face model directory (no config.json): {model_dir}", hint="save it with save_pretrained()"
        )
    return run_worker(
        "torch", model_dir, inputs, cfg, extra_args=["--dtype", dtype, "--device", device] + (["--compile"] if compile else [])
    )
