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


class WindowedLMTask:
    """Data plumbing shared by next-token tasks over one token stream per split.

    Subclasses set ``train`` and ``val`` (1-D integer arrays), ``seq_len``, ``seed`` and the fixed
    validation window starts ``_eval_starts``. Training batch ``step`` is a pure function of
    (seed, step), so a resumed run sees exactly the batches it would have seen.
    """

    seq_len: int
    seed: int
    train: np.ndarray
    val: np.ndarray
    _eval_starts: np.ndarray
    logits_dtype: type = np.float64  # dtype the scores are computed in (float32 for large vocabularies)

    def train_batch(self, step: int, batch_size: int):
        """Batch ``step`` of the training stream as an int64 tensor ``[batch_size, seq_len]``."""
        import torch

        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, size=batch_size)
        idx = starts[:, None] + np.arange(self.seq_len)[None, :]
        return torch.from_numpy(self.train[idx].astype(np.int64))

    def eval_batches(self, batch_size: int = 16) -> Iterator[np.ndarray]:
        idx_all = self._eval_starts[:, None] + np.arange(self.seq_len)[None, :]
        for i in range(0, len(idx_all), batch_size):
            yield self.val[idx_all[i : i + batch_size]].astype(np.int64)

    def calibration_batches(self, n: int, batch_size: int = 8) -> Iterator[np.ndarray]:
        """Training windows for PTQ calibration and importance estimation (never validation data)."""
        for i in range(n):
            yield self.train_batch(10_000_000 + i, batch_size).numpy()

    def example_inputs(self, batch_size: int = 1) -> np.ndarray:
        return next(self.eval_batches(batch_size))[:batch_size]

    def eval_windows(self) -> np.ndarray:
        """The fixed validation windows ``[N, seq_len]`` (int64) that :meth:`score` reads, in order."""
        return np.concatenate(list(self.eval_batches(64)))

    def score(self, predict: PredictFn, batch_size: int) -> tuple[int, float, int]:
        """``(correct, total negative log-likelihood in nats, count)`` of next-token predictions on the validation windows.

        The arithmetic is :func:`dsk_compress.runtimes.measure.score_windows`, which a deploy bundle's run.py shares.
        """
        from dsk_compress.runtimes.measure import score_windows

        return score_windows(predict, self.eval_windows(), batch_size, self.logits_dtype)
