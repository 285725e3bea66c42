"""Compression stages' building blocks: the shared trainer, distillation, pruning, QAT, MoE helpers."""
