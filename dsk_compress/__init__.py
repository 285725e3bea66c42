"""dsk-compress: distill MoE teachers into dense students, prune, quantize, export, benchmark."""

from __future__ import annotations

__version__ = "0.1.0"
