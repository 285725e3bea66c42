"""The Task protocol: data + metrics, shared by torch models and exported runtimes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]
"""Maps a batch of inputs (numpy) to the model's outputs (numpy logits)."""


@dataclass
class Metrics:
    """Scores of one model on a task's fixed validation sample."""

    accuracy: float
    extra: dict[str, float] = field(default_factory=dict)
    primary: str = "accuracy"

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, **self.extra}


@runtime_checkable
class Task(Protocol):
    """What a stage needs to train, fine-tune and score a model.

    ``evaluate`` takes a function from input batch to logits, so the very same code scores a
    torch model and an exported artifact running in ONNX Runtime.
    """

    name: str
    seq_len: int

    def train_batch(self, step: int, batch_size: int) -> Any: ...

    def eval_batches(self, batch_size: int) -> Iterator[np.ndarray]: ...

    def example_inputs(self, batch_size: int = 1) -> np.ndarray: ...

    def evaluate(self, predict: PredictFn, batch_size: int = 16) -> Metrics: ...

    def fingerprint(self) -> str: ...
