"""INT8 quantization-aware training.

Weights: per-output-channel symmetric fake quant (scale = absmax / qmax). With ``avx2_safe`` the
8-bit range is cut to +-63 so ONNX Runtime's u8s8 integer kernels cannot saturate on CPUs without
VNNI (the exported tensor is still int8). Activations: per-tensor, an :class:`ActivationQuantizer`
(an observer phase, running min/max, then a learned scale, LSQ), either ``asymmetric`` (uint8 with a
zero point, ONNX Runtime's preferred form) or ``symmetric`` (int8, zero point 0: the only form
TensorRT's explicit quantization accepts).

One quantizer per input tensor: layers that read the same tensor (a decoder's q/k/v projections after the
attention norm, gate/up after the MLP norm, parallel conv branches) share one ActivationQuantizer, found
by :func:`calibrate` on its first batch (``share_inputs``). Their quantized inputs are then identical, so
the exporter can pack them into one integer MatMul behind one QuantizeLinear, and TensorRT sees one scale
per tensor. Convs get BatchNorm folded in before QAT (``dsk_compress.compress.cnn.fold_batchnorm``). A
QAT causal LM is saved and rebuilt with ``save_qat_model`` / ``load_qat_model`` (config, safetensors
state, ``qat.json`` with the shared groups; a version-1 ``qat.json`` predates sharing and loads untied).

int4 (``scheme: int4``, :func:`prepare_int4_qat`): what ONNX Runtime's ``MatMulNBits`` computes with
``accuracy_level`` 4, simulated exactly. Weights: symmetric int4 ([-8, 7], stored with zero point 8) per block of
:data:`NBITS_BLOCK` input features, one scale per (output, block), initialised by MSE search (or absmax) and then
learned with LSQ (:class:`BlockQuantLinear`). Activations: int8 per row and per block of the same size along K,
symmetric, scale = absmax / 127, rounded half to even; dynamic (computed from the tensor itself, as the kernel
does at run time) with a straight-through gradient. The LM head is the same layer at 8 (or 4) bits, the embedding
table int8 per row (:class:`QuantEmbedding`). The exporter (``export/int4.py``) packs the integers this fake quant
computes with its scales, so the graph computes what training saw.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_MODES = ("asymmetric", "symmetric")
QAT_INFO_VERSION = 3
"""Version of ``qat.json``: 3 adds ``scheme`` (``int8`` | ``int4``) and the int4 settings; 2 records ``shared_input_quantizers``;
1 (no sharing, quantizer state under ``act_*`` keys) still loads. Versions 1 and 2 are int8."""
SCHEMES = ("int8", "int4")
NBITS_BLOCK = 32
"""Block of input features that shares one weight scale and one activation scale (MatMulNBits' ``block_size``)."""
SCALE_INITS = ("mse", "absmax")


def activation_range(activations: str) -> tuple[int, int]:
    """The integer range of an activation quantizer: uint8 [0, 255] or int8 [-128, 127]."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    return (-128, 127) if activations == "symmetric" else (0, 255)


def weight_qmax(bits: int, avx2_safe: bool) -> int:
    qmax = 2 ** (bits - 1) - 1
    return 63 if (avx2_safe and bits == 8) else qmax


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quant of a layer input: observe the running min/max, then (after :meth:`freeze`) quantize with
    a learned LSQ scale and a fixed zero point. One instance may serve several layers that read the same tensor."""

    def __init__(self, activations: str = "asymmetric") -> None:
        super().__init__()
        self.activations = activations
        self.qmin, self.qmax = activation_range(activations)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("observed_min", torch.tensor(float("inf")))
        self.register_buffer("observed_max", torch.tensor(float("-inf")))
        self.register_buffer("observing", torch.tensor(True))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self.observed_min.copy_(torch.minimum(self.observed_min, x.min().float()))
        self.observed_max.copy_(torch.maximum(self.observed_max, x.max().float()))

    @torch.no_grad()
    def freeze(self) -> None:
        """End the observer phase: the scale and zero point from the observed range (always including 0)."""
        lo = min(float(self.observed_min), 0.0)
        hi = max(float(self.observed_max), 0.0)
        if self.activations == "symmetric":
            # zero point 0; +-absmax maps to +-127 (TensorRT quantizes to [-128, 127])
            scale = max(max(-lo, hi) / self.qmax, 1e-8)
            zp = 0.0
        else:
            scale = max((hi - lo) / 255.0, 1e-8)
            zp = float(min(255, max(0, round(-lo / scale))))
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)
        self.observing.fill_(False)

    def forward(self, x: torch.Tensor, features: int) -> torch.Tensor:
        """``x`` fake-quantized (or observed and returned as is); ``features``: the size of ``x``'s feature axis."""
        if self.observing.item():
            self.observe(x)
            return x
        if self.training:
            # LSQ gradient scale 1/sqrt(N * Qp), Qp the largest positive level
            grad_factor = 1.0 / math.sqrt(x.numel() / features * self.qmax)
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale.reshape(1), self.zero_point.reshape(1), self.qmin, self.qmax, grad_factor
            )
        return torch.fake_quantize_per_tensor_affine(x, self.scale.item(), int(self.zero_point.item()), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"a8 {self.activations}"


_LEGACY_KEYS = {
    "act_scale": "scale",
    "act_zero_point": "zero_point",
    "act_min": "observed_min",
    "act_max": "observed_max",
    "observing": "observing",
}
"""State-dict names of a layer's activation quantizer before it became the ``input_quantizer`` submodule (qat.json version 1)."""


def _legacy_quantizer_keys(module, state_dict, prefix, *args) -> None:
    """Load-time pre-hook: move a version-1 layer's ``act_*`` entries to ``input_quantizer.*``."""
    for old, new in _LEGACY_KEYS.items():
        if prefix + old in state_dict:
            state_dict[f"{prefix}input_quantizer.{new}"] = state_dict.pop(prefix + old)


class _FakeQuant(nn.Module):
    """What every fake-quant layer shares: a per-output-channel weight quantizer (axis 0) and an
    :class:`ActivationQuantizer` of its input (``input_quantizer``, possibly shared). Subclasses set ``weight``,
    ``bias`` and ``forward``; ``_features`` is the size of the input's feature axis (for the LSQ gradient scale)."""

    def _init_quant(self, weight_bits: int, avx2_safe: bool, activations: str) -> None:
        self.weight_bits = weight_bits
        self.qmax = weight_qmax(weight_bits, avx2_safe)
        self.input_quantizer = ActivationQuantizer(activations)
        self.register_load_state_dict_pre_hook(_legacy_quantizer_keys)

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

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x, self._features(x))


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
        return f"{self.in_features}, {self.out_features}, w{self.weight_bits}(qmax={self.qmax})"


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
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"w{self.weight_bits}(qmax={self.qmax})"
        )


_QUANT_WRAPPERS: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


# ---------------------------------------------------------------------------------------------
# int4: ONNX Runtime's MatMulNBits with accuracy_level 4, simulated exactly


def _pad_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x [..., K]`` zero-padded to a multiple of ``block`` along K and viewed as ``[..., K / block, block]``."""
    pad = -x.shape[-1] % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block)


class _BlockActivationQuant(torch.autograd.Function):
    """What MLAS does to MatMulNBits' input at accuracy_level 4 (``QuantizeARow_CompInt8``): per row and per block of
    ``block`` along K, ``scale = absmax / 127``, ``q = round_half_even(x * (127 / absmax))`` in float32; returns
    ``q * scale``. Straight-through gradient (every level is inside the range: the block's absmax maps to +-127)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int) -> torch.Tensor:
        k = x.shape[-1]
        xb = _pad_blocks(x.float(), block)
        amax = xb.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        y = torch.round(xb * inv) * (amax / 127.0)
        return y.reshape(*x.shape[:-1], -1)[..., :k].to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def block_quantize_activations(x: torch.Tensor, block: int = NBITS_BLOCK) -> torch.Tensor:
    """``x`` fake-quantized as MatMulNBits (accuracy_level 4) quantizes its input at run time: int8 per row and per block
    of ``block`` features, symmetric absmax / 127 (:class:`_BlockActivationQuant`)."""
    return _BlockActivationQuant.apply(x, block)


class _LSQ(torch.autograd.Function):
    """``clamp(round(w / s), qmin, qmax) * s`` for rows ``w [R, B]`` with one scale per row ``s [R, 1]``, with LSQ's
    gradients (Esser et al. 2020): straight-through for ``w`` inside the range, and for ``s`` the step-size gradient
    (``q - w / s`` inside, the clamped level outside) times ``grad_factor``. The forward value is exactly the integer
    times the scale, so an exporter that packs :func:`block_integers` computes the same weight."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, grad_factor: float) -> torch.Tensor:
        v = w / s
        q = torch.clamp(torch.round(v), qmin, qmax)
        ctx.save_for_backward(v, q)
        ctx.qmin, ctx.qmax, ctx.grad_factor = qmin, qmax, grad_factor
        return q * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, q = ctx.saved_tensors
        inside = (v >= ctx.qmin) & (v <= ctx.qmax)
        grad_w = grad * inside
        grad_s = (grad * torch.where(inside, q - v, q)).sum(-1, keepdim=True) * ctx.grad_factor
        return grad_w, grad_s, None, None, None


def block_integers(w: torch.Tensor, scales: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """The integers ``[out, blocks * block]`` (int8 holding ``bits``-bit values) that :class:`BlockQuantLinear`'s fake
    quant multiplies by ``scales [out, blocks]``: ``clamp(round(w / s), -2^(bits-1), 2^(bits-1) - 1)``, padding zero."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    with torch.no_grad():
        wb = _pad_blocks(w.detach().float(), block)
        q = torch.clamp(torch.round(wb / scales.detach().float()[..., None]), qmin, qmax)
    return q.reshape(w.shape[0], -1).to(torch.int8)


@torch.no_grad()
def init_block_scales(w: torch.Tensor, bits: int, block: int, method: str = "mse", grid: int = 64) -> torch.Tensor:
    """Per-(row, block) scales ``[out, blocks]`` of a symmetric ``bits``-bit quantizer of ``w [out, K]``.

    ``absmax``: ``absmax / qmax`` (nothing clipped). ``mse``: the scale ``r * absmax / qmax`` with the least squared
    error of the block, ``r`` searched over ``grid`` values in [0.4, 8/7] (below 1 clips the extremes to buy resolution;
    8/7 maps a negative extreme to -2^(bits-1) exactly, as ONNX Runtime's RTN quantizer does).
    """
    if method not in SCALE_INITS:
        raise ValueError(f"scale_init must be one of {SCALE_INITS}, got {method!r}")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    wb = _pad_blocks(w.float(), block)
    base = (wb.abs().amax(-1) / qmax).clamp_min(1e-8)
    if method == "absmax":
        return base
    best, best_err = base.clone(), torch.full_like(base, float("inf"))
    for r in torch.linspace(0.4, 8 / 7, grid).tolist():
        s = base * r
        err = ((torch.clamp(torch.round(wb / s[..., None]), qmin, qmax) * s[..., None] - wb) ** 2).sum(-1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


class BlockQuantLinear(nn.Module):
    """A Linear as ONNX Runtime's ``MatMulNBits`` (accuracy_level 4) computes it: ``bits``-bit symmetric weights with one
    learned (LSQ) scale per output and block of ``block_size`` inputs, input activations int8 per row and block (dynamic).

    ``weight_scale`` is stored flat (``[out * blocks]``): a 1-D parameter, which the trainer's AdamW does not decay.
    """

    def __init__(self, linear: nn.Linear, weight_bits: int = 4, block_size: int = NBITS_BLOCK, scale_init: str = "mse") -> None:
        super().__init__()
        if weight_bits not in (4, 8):
            raise ValueError(f"MatMulNBits QAT takes 4- or 8-bit weights, got {weight_bits}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16 (MatMulNBits), got {block_size}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight_bits, self.block_size = weight_bits, block_size
        self.qmin, self.qmax = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
        self.blocks = -(-self.in_features // block_size)
        scales = init_block_scales(linear.weight.detach(), weight_bits, block_size, scale_init)
        self.weight_scale = nn.Parameter(scales.reshape(-1).to(linear.weight.dtype))

    def block_scales(self) -> torch.Tensor:
        """The scales in use, ``[out, blocks]`` (kept positive)."""
        return self.weight_scale.clamp_min(1e-8).reshape(self.out_features, self.blocks)

    def quantized_weight(self) -> torch.Tensor:
        wb = _pad_blocks(self.weight, self.block_size).reshape(-1, self.block_size)
        grad_factor = 1.0 / math.sqrt(self.block_size * self.qmax)
        wq = _LSQ.apply(wb, self.block_scales().reshape(-1, 1), self.qmin, self.qmax, grad_factor)
        return wq.reshape(self.out_features, -1)[:, : self.in_features]

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the exporter packs: the integers ``[out, blocks * block_size]`` (int8) and the scales ``[out, blocks]`` (float32)."""
        scales = self.block_scales().detach().float()
        return block_integers(self.weight, scales, self.weight_bits, self.block_size), scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(block_quantize_activations(x, self.block_size), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w{self.weight_bits} block {self.block_size}, a8 dynamic per block"


class QuantEmbedding(nn.Module):
    """An embedding table fake-quantized to int8 per row (symmetric, scale = row absmax / 127; straight-through)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight

    def row_scales(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.detach().float().abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-12)

    def integer_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the exporter stores: the int8 table ``[V, H]`` and the row scales ``[V]`` (float32)."""
        with torch.no_grad():
            w = self.weight.detach().float()
            s = self.row_scales(w)
            return torch.clamp(torch.round(w / s), -127, 127).to(torch.int8), s[:, 0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx)  # quantize the rows looked up (per-row scales: the same numbers)
        shape = rows.shape
        flat = rows.reshape(-1, shape[-1])
        return _LSQ.apply(flat, self.row_scales(flat), -127, 127, 0.0).reshape(shape).to(rows.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


def block_quant_layers(model: nn.Module) -> list[BlockQuantLinear]:
    """Every :class:`BlockQuantLinear` in module order."""
    return [m for m in model.modules() if isinstance(m, BlockQuantLinear)]


def qat_scheme(model: nn.Module) -> str | None:
    """``int4`` (MatMulNBits layers), ``int8`` (QuantLinear / QuantConv2d, with or without an int8 embedding) or None (a
    float model)."""
    if any(isinstance(m, BlockQuantLinear) for m in model.modules()):
        return "int4"
    if quant_layers(model):
        return "int8"
    return "int4" if any(isinstance(m, QuantEmbedding) for m in model.modules()) else None


def skipped(name: str, skip: list[str]) -> bool:
    """Whether the module ``name`` is one ``skip`` keeps in float: named exactly, by its last parts, or inside a named one."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def prepare_int4_qat(
    model: nn.Module,
    block_size: int = NBITS_BLOCK,
    scale_init: str = "mse",
    head_bits: int | None = 8,
    embedding_bits: int | None = 8,
    skip: list[str] | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` of a causal LM not named in ``skip`` with a 4-bit :class:`BlockQuantLinear` (in place),
    the LM head with one of ``head_bits`` (8, 4, or None: left float) and the input embedding with a
    :class:`QuantEmbedding` when ``embedding_bits`` is 8 (None: left float). Returns the names of the quantized modules.

    ``skip`` names modules kept in float (matched as :func:`prepare_qat` does); the LM head follows ``head_bits`` alone.
    """
    if scale_init not in SCALE_INITS:
        raise ValueError(f"scale_init must be one of {SCALE_INITS}, got {scale_init!r}")
    if head_bits not in (None, 4, 8) or embedding_bits not in (None, 8):
        raise ValueError(f"head_bits must be 8, 4 or None and embedding_bits 8 or None, got {head_bits}, {embedding_bits}")
    skip = skip or []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if child is head and head is not None:
                bits = head_bits
            elif type(child) is nn.Linear and not skipped(full, skip):
                bits = 4
            else:
                bits = None
            if bits is not None and type(child) is nn.Linear:
                setattr(module, child_name, BlockQuantLinear(child, bits, block_size, scale_init))
                names.append(full)
            elif child is emb and embedding_bits == 8 and type(child) is nn.Embedding:
                setattr(module, child_name, QuantEmbedding(child))
                names.append(full)
    return names


def prepare_qat(
    model: nn.Module,
    weight_bits: int = 8,
    avx2_safe: bool = True,
    skip: list[str] | None = None,
    activations: str = "asymmetric",
    shared_inputs: list[list[str]] | None = None,
    embedding_bits: int | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` not named in ``skip`` with a QuantLinear / QuantConv2d (in place);
    return their names. Fold BatchNorm into the convs before (``dsk_compress.compress.cnn.fold_batchnorm``).
    ``embedding_bits`` 8: a causal LM's input embedding becomes a :class:`QuantEmbedding` (int8 per row; its name among those returned).

    ``activations``: ``asymmetric`` (uint8 + zero point) or ``symmetric`` (int8, zero point 0, for TensorRT).
    ``shared_inputs``: groups of layer names that share one activation quantizer (:func:`share_input_quantizers`;
    a saved model's groups); :func:`calibrate` finds them for a new model.
    """
    activation_range(activations)  # validate before touching the model
    if embedding_bits not in (None, 8):
        raise ValueError(f"embedding_bits must be 8 or None, got {embedding_bits}")
    skip = skip or []
    names = []
    emb = model.get_input_embeddings() if embedding_bits == 8 and hasattr(model, "get_input_embeddings") else None
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            wrap = _QUANT_WRAPPERS.get(type(child))
            if wrap is not None and not skipped(full, skip):
                setattr(module, child_name, wrap(child, weight_bits, avx2_safe, activations))
                names.append(full)
            elif child is emb and type(child) is nn.Embedding:
                setattr(module, child_name, QuantEmbedding(child))
                names.append(full)
    share_input_quantizers(model, shared_inputs or [])
    return names


def quant_layers(model: nn.Module) -> list[_FakeQuant]:
    """Every fake-quant layer (QuantLinear and QuantConv2d) in module order."""
    return [m for m in model.modules() if isinstance(m, _FakeQuant)]


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Every distinct activation quantizer (a shared one once), in module order."""
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer)]


def share_input_quantizers(model: nn.Module, groups: list[list[str]]) -> None:
    """Give the fake-quant layers of each group (module names) one activation quantizer: the first layer's, with the
    union of the group's observed ranges. Only before :func:`freeze_observers` (a trained scale is not re-derived)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _FakeQuant)}
    for group in groups:
        missing = [n for n in group if n not in layers]
        if missing:
            raise ValueError(f"not fake-quant layers of this model: {', '.join(missing)}")
        first = layers[group[0]].input_quantizer
        for n in group[1:]:
            q = layers[n].input_quantizer
            if q is first:
                continue
            if q.activations != first.activations:
                raise ValueError(f"{group[0]} and {n} quantize their input differently ({first.activations}, {q.activations})")
            if not (bool(q.observing) and bool(first.observing)):
                raise ValueError(f"{group[0]} / {n}: share quantizers before calibration freezes them")
            with torch.no_grad():
                first.observed_min.copy_(torch.minimum(first.observed_min, q.observed_min))
                first.observed_max.copy_(torch.maximum(first.observed_max, q.observed_max))
            layers[n].input_quantizer = first


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """The groups (module names, in module order, two or more each) of fake-quant layers that share one activation quantizer."""
    by_quantizer: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        if isinstance(m, _FakeQuant):
            by_quantizer.setdefault(id(m.input_quantizer), []).append(n)
    return [g for g in by_quantizer.values() if len(g) > 1]


def find_shared_inputs(model: nn.Module, run) -> list[list[str]]:
    """Groups (module names, in module order) of fake-quant layers that read the same tensor while ``run()`` runs the model.

    A layer that reads several tensors joins their groups (one scale then serves them all).
    """
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, _FakeQuant)}
    order = {n: k for k, n in enumerate(names.values())}
    readers: dict[int, list[str]] = {}
    alive = []  # the inputs stay referenced until the end, so no id is reused within the run

    def hook(module, args):
        alive.append(args[0])
        readers.setdefault(id(args[0]), []).append(names[id(module)])

    handles = [m.register_forward_pre_hook(hook) for m in quant_layers(model)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    parent = {n: n for n in names.values()}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for group in readers.values():
        for n in group[1:]:
            a, b = root(group[0]), root(n)
            if a != b:
                parent[max(a, b, key=order.get)] = min(a, b, key=order.get)
    groups: dict[str, list[str]] = {}
    for n in names.values():
        groups.setdefault(root(n), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def freeze_observers(model: nn.Module) -> None:
    for q in activation_quantizers(model):
        q.freeze()


def freeze_for_export(model: nn.Module) -> None:
    for m in quant_layers(model):
        m.freeze_weight_scale()


def calibrate(model: nn.Module, batches, forward=None, share_inputs: bool = True) -> None:
    """Run ``batches`` through the model with observers on, then freeze activation ranges.

    ``forward(model, x)`` runs one batch (default: a Hugging Face causal LM on ``input_ids``). ``share_inputs``:
    on the first batch, find the layers that read the same tensor (:func:`find_shared_inputs`) and give each such
    group one quantizer (:func:`share_input_quantizers`) before the ranges are frozen.
    """
    dev = next(model.parameters()).device
    model.eval()

    def run(x) -> None:
        x = torch.as_tensor(x, device=dev)
        if forward is None:
            model(input_ids=x, use_cache=False)
        else:
            forward(model, x)

    with torch.no_grad():
        for k, x in enumerate(batches):
            if k == 0 and share_inputs:
                share_input_quantizers(model, find_shared_inputs(model, lambda: run(x)))  # noqa: B023 (called at once)
            else:
                run(x)
    freeze_observers(model)


def sqnr_db(reference: torch.Tensor | np.ndarray, test) -> float:  # noqa: F821
    """Signal-to-quantization-noise ratio in dB of ``test`` against ``reference``."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    return float(10 * np.log10((ref**2).mean() / max((err**2).mean(), 1e-30)))


def qat_info(
    model: nn.Module,
    weight_bits: int,
    avx2_safe: bool,
    activations: str,
    skip: list[str],
    names: list[str],
    embedding_bits: int | None = None,
) -> dict:
    """What ``qat.json`` (or a torch model's ``dsk_model.json``) records of a QAT model to rebuild it: its quantization
    settings, quantized layers and the groups sharing one activation quantizer."""
    layers = quant_layers(model)
    return {
        "version": QAT_INFO_VERSION,
        "scheme": "int8",
        "weight_bits": weight_bits,
        "activation_bits": 8,
        "activations": activations,
        "avx2_safe": avx2_safe,
        "skip": list(skip),
        "embedding_bits": embedding_bits,
        "quantized_layers": names,
        "weight_qmax": layers[0].qmax if layers else None,
        "shared_input_quantizers": shared_input_groups(model),
    }


def int4_qat_info(
    block_size: int, scale_init: str, head_bits: int | None, embedding_bits: int | None, skip: list[str], names: list[str]
) -> dict:
    """What ``qat.json`` records of an int4 QAT model (:func:`prepare_int4_qat`) to rebuild it."""
    return {
        "version": QAT_INFO_VERSION,
        "scheme": "int4",
        "weight_bits": 4,
        "block_size": block_size,
        "scale_init": scale_init,
        "head_bits": head_bits,
        "embedding_bits": embedding_bits,
        "activation_bits": 8,
        "activations": "dynamic-block",
        "skip": list(skip),
        "quantized_layers": names,
        "shared_input_quantizers": [],
    }


def save_qat_model(model: nn.Module, path: Path, info: dict) -> Path:
    """Save a QAT causal LM to the directory ``path``: its config, its state (quantizer scales included) as
    safetensors, and ``qat.json`` (``info``, from :func:`qat_info`; its version and shared groups are the model's
    own) for :func:`load_qat_model`."""
    from dsk_compress.io import atomic_write_json, save_state_dict

    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_state_dict(model.state_dict(), path / "qat_state.safetensors")
    atomic_write_json(path / "qat.json", {**info, "version": QAT_INFO_VERSION, "shared_input_quantizers": shared_input_groups(model)})
    return path


def load_qat_model(path: Path) -> nn.Module:
    """Rebuild a QAT model saved by :func:`save_qat_model`: the config's architecture, QuantLinear layers (sharing
    quantizers as recorded; a version-1 ``qat.json`` has none) or, for ``scheme: int4``, BlockQuantLinear layers and
    the int8 embedding, then the saved state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsk_compress.errors import RunError
    from dsk_compress.io import load_state_dict, read_json

    info = read_json(Path(path) / "qat.json")
    int4 = isinstance(info, dict) and info.get("scheme", "int8") == "int4"
    try:
        if int4:
            int4_args = {
                "block_size": int(info["block_size"]),
                "head_bits": info["head_bits"],
                "embedding_bits": info["embedding_bits"],
                "skip": list(info["skip"]),
            }
        else:
            bits, avx2_safe, skip = int(info["weight_bits"]), bool(info["avx2_safe"]), list(info["skip"])
            shared = [[str(n) for n in g] for g in info.get("shared_input_quantizers", [])]
            embedding_bits = info.get("embedding_bits")  # absent before int8 QAT had an int8 embedding
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{Path(path) / 'qat.json'} is damaged ({type(e).__name__}: {e})", hint="re-run the qat stage") from None
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    try:
        if int4:  # the saved state holds the trained scales: no MSE search here
            prepare_int4_qat(model, scale_init="absmax", **int4_args)
        else:
            prepare_qat(
                model,
                bits,
                avx2_safe,
                skip,
                activations=info.get("activations", "asymmetric"),
                shared_inputs=shared,
                embedding_bits=embedding_bits,
            )
    except ValueError as e:
        raise RunError(f"{Path(path) / 'qat.json'} does not fit the model: {e}", hint="re-run the qat stage") from None
    try:
        model.load_state_dict(load_state_dict(path / "qat_state.safetensors"))
    except RuntimeError as e:
        raise RunError(
            f"{Path(path) / 'qat_state.safetensors'} does not fit {Path(path) / 'qat.json'}: {str(e).splitlines()[0][:200]}",
            hint="re-run the qat stage",
        ) from None
    return model.eval()
