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
