"""Helpers for any torch model, at the bottom of the import graph.

This module imports nothing from ``dsk_compress``, so every layer can use it: ``compress/`` (pruning,
MoE expert pruning) as well as ``models.source`` and ``models.zoo``, which in turn import
``compress/``. Keeping these helpers here is what keeps that import graph free of cycles.
"""

from __future__ import annotations

from contextlib import contextmanager


def count_params(model) -> int:
    """Number of parameters of a torch module (every element of every parameter)."""
    return int(sum(p.numel() for p in model.parameters()))


@contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for the block and restore its train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def cache_kwargs(model, cache) -> dict:
    """``cache`` as ``model``'s forward takes it: ``cache=`` where its signature has it (transformers 5.2x, which
    deprecates ``past_key_values=``), else ``past_key_values=``."""
    import inspect

    forward = getattr(model, "forward", model)
    return {"cache" if "cache" in inspect.signature(forward).parameters else "past_key_values": cache}


def output_cache(out):
    """The KV cache a forward returned (``out.cache`` in transformers 5.2x, ``out.past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values
