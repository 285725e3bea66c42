"""INT8 quantization-aware training.

Weights: per-output-channel symmetric fake quant (scale = absmax / qmax). With ``avx2_safe`` the
8-bit range is cut to +-63 so ONNX Runtime's u8s8 integer kernels cannot saturate on CPUs without
VNNI (the exported tensor is still int8). Activations: per-tensor, an observer phase (running
min/max) and then a learned scale (LSQ), either ``asymmetric`` (uint8 with a zero point, ONNX
Runtime's preferred form) or ``symmetric`` (int8, zero point 0: the only form TensorRT's explicit
quantization accepts). Each Linear / Conv2d has its own activation quantizer; the exporter may merge
quantizers that see the same tensor with the same scale. Convs get BatchNorm folded in before QAT
(``dsk_compress.compress.cnn.fold_batchnorm``). A QAT causal LM is saved and rebuilt with
``save_qat_model`` / ``load_qat_model`` (config, safetensors state, ``qat.json``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


ACTIVATION_MODES = ("asymmetric", "symmetric")


def activation_range(activations: str) -> tuple[int, int]:
    """The integer range of an activation quantizer: uint8 [0, 255] or int8 [-128, 127]."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    return (-128, 127) if activations == "symmetric" else (0, 255)


def weight_qmax(bits: int, avx2_safe: bool) -> int:
    qmax = 2 ** (bits - 1) - 1
    return 63 if (avx2_safe and bits == 8) else qmax


class _FakeQuant(nn.Module):
    """What every fake-quant layer shares: a per-output-channel weight quantizer (axis 0) and a per-tensor
    input activation quantizer (observer phase, then a learned LSQ scale). Subclasses set ``weight``,
    ``bias`` and ``forward``; ``_features`` is the size of the input's feature axis (for the LSQ gradient scale)."""

    def _init_quant(self, weight_bits: int, avx2_safe: bool, activations: str) -> None:
        self.activations = activations
        self.act_qmin, self.act_qmax = activation_range(activations)
        self.weight_bits = weight_bits
        self.qmax = weight_qmax(weight_bits, avx2_safe)
        self.act_scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("act_zero_point", torch.tensor(0.0))
        self.register_buffer("act_min", torch.tensor(float("inf")))
        self.register_buffer("act_max", torch.tensor(float("-inf")))
        self.register_buffer("observing", torch.tensor(True))

    def _features(self, x: torch.Tensor) -> int:
        return x.shape[-1]

    def weight_scale(self) -> torch.Tensor:
        frozen = getattr(self, "frozen_weight_scale", None)
        if frozen is not None:
            return frozen
        w = self.weight.detach()
        return (w.abs().amax(dim=tuple(range(1, w.ndim))) / self.qmax).clamp_min(1e-8)

    @torch.no_grad()
    def freeze_weight_scale(self) -> None:
        """Fix the weight scales (for export: they become constants in the graph)."""
        self.frozen_weight_scale = None
        self.frozen_weight_scale = self.weight_scale().clone()

    def quantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale()
        zp = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(self.weight, scale, zp, 0, -128, 127)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        self.act_min.copy_(torch.minimum(self.act_min, lo))
        self.act_max.copy_(torch.maximum(self.act_max, hi))

    @torch.no_grad()
    def freeze_observer(self) -> None:
        lo = min(float(self.act_min), 0.0)
        hi = max(float(self.act_max), 0.0)
        if self.activations == "symmetric":
            # zero point 0; +-absmax maps to +-127 (TensorRT quantizes to [-128, 127])
            scale = max(max(-lo, hi) / self.act_qmax, 1e-8)
            zp = 0.0
        else:
            scale = max((hi - lo) / 255.0, 1e-8)
            zp = float(min(255, max(0, round(-lo / scale))))
        self.act_scale.fill_(scale)
        self.act_zero_point.fill_(zp)
        self.observing.fill_(False)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing.item():
            self._observe(x)
            return x
        if self.training:
            # LSQ gradient scale 1/sqrt(N * Qp), Qp the largest positive level
            grad_factor = 1.0 / math.sqrt(x.numel() / self._features(x) * self.act_qmax)
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.act_scale.reshape(1), self.act_zero_point.reshape(1), self.act_qmin, self.act_qmax, grad_factor
            )
        return torch.fake_quantize_per_tensor_affine(x, self.act_scale.item(), int(self.act_zero_point.item()), self.act_qmin, self.act_qmax)


class QuantLinear(_FakeQuant):
    """A Linear with fake-quantized input activations and weights."""

    def __init__(self, linear: nn.Linear, weight_bits: int = 8, avx2_safe: bool = True, activations: str = "asymmetric") -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_quant(weight_bits, avx2_safe, activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w{self.weight_bits}(qmax={self.qmax}), a8 {self.activations}"


class QuantConv2d(_FakeQuant):
    """A Conv2d with fake-quantized input activations and per-output-channel weights (fold BatchNorm into it first)."""

    def __init__(self, conv: nn.Conv2d, weight_bits: int = 8, avx2_safe: bool = True, activations: str = "asymmetric") -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_quant(weight_bits, avx2_safe, activations)

    def _features(self, x: torch.Tensor) -> int:
        return x.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantize_input(x), self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"w{self.weight_bits}(qmax={self.qmax}), a8 {self.activations}")


_QUANT_WRAPPERS: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def prepare_qat(model: nn.Module, weight_bits: int = 8, avx2_safe: bool = True, skip: list[str] | None = None,
                activations: str = "asymmetric") -> list[str]:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` not named in ``skip`` with a QuantLinear / QuantConv2d (in place);
    return their names. Fold BatchNorm into the convs before (``dsk_compress.compress.cnn.fold_batchnorm``).

    ``activations``: ``asymmetric`` (uint8 + zero point) or ``symmetric`` (int8, zero point 0, for TensorRT).
    """
    activation_range(activations)  # validate before touching the model
    skip = skip or []
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            wrap = _QUANT_WRAPPERS.get(type(child))
            if wrap is not None and not any(full == s or full.endswith("." + s) or full.startswith(s + ".") for s in skip):
                setattr(module, child_name, wrap(child, weight_bits, avx2_safe, activations))
                names.append(full)
    return names


def quant_layers(model: nn.Module) -> list[_FakeQuant]:
    """Every fake-quant layer (QuantLinear and QuantConv2d) in module order."""
    return [m for m in model.modules() if isinstance(m, _FakeQuant)]


def freeze_observers(model: nn.Module) -> None:
    for m in quant_layers(model):
        m.freeze_observer()


def freeze_for_export(model: nn.Module) -> None:
    for m in quant_layers(model):
        m.freeze_weight_scale()


def calibrate(model: nn.Module, batches, forward=None) -> None:
    """Run ``batches`` through the model with observers on, then freeze activation ranges.

    ``forward(model, x)`` runs one batch (default: a Hugging Face causal LM on ``input_ids``).
    """
    dev = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for x in batches:
            x = torch.as_tensor(x, device=dev)
            if forward is None:
                model(input_ids=x, use_cache=False)
            else:
                forward(model, x)
    freeze_observers(model)


def sqnr_db(reference: torch.Tensor | "np.ndarray", test) -> float:  # noqa: F821
    """Signal-to-quantization-noise ratio in dB of ``test`` against ``reference``."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    return float(10 * np.log10((ref**2).mean() / max((err**2).mean(), 1e-30)))


def save_qat_model(model: nn.Module, path: Path, qat_info: dict) -> Path:
    """Save a QAT causal LM to the directory ``path``: its config, its state (quantizer scales included) as
    safetensors, and ``qat.json`` (``qat_info``: bits, activations, skipped layers) for :func:`load_qat_model`."""
    from dsk_compress.io import atomic_write_json, save_state_dict

    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_state_dict(model.state_dict(), path / "qat_state.safetensors")
    atomic_write_json(path / "qat.json", qat_info)
    return path


def load_qat_model(path: Path) -> nn.Module:
    """Rebuild a QAT model saved by :func:`save_qat_model`: the config's architecture, QuantLinear layers, then the saved state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsk_compress.errors import RunError
    from dsk_compress.io import load_state_dict, read_json

    info = read_json(Path(path) / "qat.json")
    try:
        bits, avx2_safe, skip = int(info["weight_bits"]), bool(info["avx2_safe"]), list(info["skip"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{Path(path) / 'qat.json'} is damaged ({type(e).__name__}: {e})", hint="re-run the qat stage") from None
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    prepare_qat(model, bits, avx2_safe, skip, activations=info.get("activations", "asymmetric"))
    model.load_state_dict(load_state_dict(path / "qat_state.safetensors"), strict=False)
    return model.eval()
