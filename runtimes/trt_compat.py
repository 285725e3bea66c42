"""What differs between the TensorRT releases a device may have: 8.5 / 8.6 (JetPack 5 and 6.0), 10.x, 11.

Every function takes the imported ``tensorrt`` module (or an engine or context) as an argument, so the
version dispatch is tested with fake module objects on machines without TensorRT. Like
:mod:`dsk_compress.runtimes.measure` this module imports nothing but the standard library, and a deploy
bundle ships it as ``dsk_trt.py`` for ``run.py``.

- Networks: TensorRT 8.x builds the ONNX parser's networks only with the ``EXPLICIT_BATCH`` creation flag
  (``create_network(0)`` is an implicit-batch network there); 10.x ignores the flag (networks are always
  explicit batch) and 11 removed it. ``STRONGLY_TYPED`` exists from 9.x; 11 types every network strongly
  and removed the ``FP16`` / ``INT8`` builder flags.
- Execution: 8.5 introduced the name-based tensor API (``num_io_tensors``, ``get_tensor_name``,
  ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) that 10.x kept alone. Engines of older
  releases use bindings; those releases are refused with a message saying which version is needed.
"""

from __future__ import annotations

MIN_VERSION = (8, 5)


def version_tuple(trt):
    """``(major, minor)`` of ``trt.__version__`` (``"8.6.2.3"`` -> ``(8, 6)``)."""
    parts = []
    for p in str(getattr(trt, "__version__", "0")).split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))


def unsupported_reason(trt):
    """Why this TensorRT cannot run our engines, or None when it can."""
    v = version_tuple(trt)
    if v < MIN_VERSION:
        return (
            "TensorRT %s predates the name-based tensor API (set_tensor_address / execute_async_v3, TensorRT 8.5); "
            "install TensorRT 8.5 or later (JetPack 5.1+)" % trt.__version__
        )
    return None


def check_supported(trt):
    """Raise RuntimeError naming the needed version when ``trt`` is older than 8.5."""
    why = unsupported_reason(trt)
    if why:
        raise RuntimeError(why)


def has_precision_flags(trt):
    """True where weakly typed networks with ``BuilderFlag.FP16`` / ``INT8`` exist (8.x, 10.x; not 11)."""
    flags = getattr(trt, "BuilderFlag", None)
    return flags is not None and hasattr(flags, "FP16") and hasattr(flags, "INT8")


def can_type_strongly(trt):
    """True where ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists (9.x and later)."""
    return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def network_flags(trt, strongly_typed):
    """The ``create_network`` flags for an ONNX-parsed network: ``EXPLICIT_BATCH`` on 8.x (required there),
    nothing on 10+ (always explicit batch), plus ``STRONGLY_TYPED`` when asked (9.x and later)."""
    check_supported(trt)
    kinds = trt.NetworkDefinitionCreationFlag
    flags = 0
    if version_tuple(trt)[0] < 10:
        flags |= 1 << int(kinds.EXPLICIT_BATCH)
    if strongly_typed:
        if not can_type_strongly(trt):
            raise RuntimeError(
                "TensorRT %s cannot build strongly typed networks (9.x or later can); build with precision flags instead" % trt.__version__
            )
        flags |= 1 << int(kinds.STRONGLY_TYPED)
    return flags


def use_strong_typing(trt, precision, onnx_is_fp16):
    """Whether to build strongly typed: always where there are no precision flags (11+), for an fp16 ONNX at
    fp16 where strong typing exists (it keeps the ONNX's fp16 / fp32 split), else weakly typed with flags."""
    if not has_precision_flags(trt):
        return True
    return precision == "fp16" and onnx_is_fp16 and can_type_strongly(trt)


def set_precision_flags(trt, config, precision, strongly_typed):
    """Allow FP16 (fp16, int8) and INT8 (int8: the Q/DQ nodes say what runs in int8) on a weakly typed network."""
    if strongly_typed:
        return
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)


def io_names(trt, engine):
    """``(input names, output names)`` of an engine (name-based API, 8.5+)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return inputs, [n for n in names if n not in inputs]


def execute(context, addresses, input_shapes, stream_handle):
    """Run ``context`` once: set every input's shape, every tensor's device address, then ``execute_async_v3``.

    Args:
        context: an ``IExecutionContext``.
        addresses: tensor name -> device pointer (int), inputs and outputs.
        input_shapes: input name -> shape tuple.
        stream_handle: the CUDA stream (int handle).
    """
    for name, shape in input_shapes.items():
        if not context.set_input_shape(name, tuple(shape)):
            raise RuntimeError("input %r shape %s is outside the engine's optimization profile" % (name, list(shape)))
    for name, ptr in addresses.items():
        context.set_tensor_address(name, int(ptr))
    if not context.execute_async_v3(stream_handle):
        raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")


def device_memory_bytes(engine):
    """Scratch device memory an execution context of ``engine`` needs, or None where TensorRT does not say."""
    for attr in ("device_memory_size_v2", "device_memory_size"):
        v = getattr(engine, attr, None)
        if v is not None:
            return int(v)
    return None
