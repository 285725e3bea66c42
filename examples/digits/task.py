"""The task factory a recipe names as ``task: {torch: "examples.digits.task:make_task"}``.

scikit-learn's bundled 8x8 handwritten digits (1797 images, ten classes; no download), pixels
scaled to [0, 1], split 80/20 into train / validation by a fixed permutation. It implements the
Task protocol of ``dsk_compress.tasks.base``: training batches are ``(images, labels)`` tensors,
``evaluate`` scores any ``predict(images) -> logits`` function (a torch model or an ONNX Runtime
session alike) on the whole validation split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from dsk_compress.tasks import Metrics


class DigitsTask:
    """Ten-class digit classification; accuracy (%) and mean cross-entropy on the validation split."""

    name = "digits"

    def __init__(self, val_fraction: float = 0.2, seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
        y = d.target.astype(np.int64)
        perm = np.random.default_rng(1234).permutation(len(y))  # the split never depends on the training seed
        n_val = int(round(len(y) * val_fraction))
        self.x_val, self.y_val = x[perm[:n_val]], y[perm[:n_val]]
        self.x_train, self.y_train = x[perm[n_val:]], y[perm[n_val:]]
        self.seed = seed
        self._fp = "digits:" + hashlib.sha256(self.x_train.tobytes() + self.x_val.tobytes()).hexdigest()[:16]

    def train_batch(self, step: int, batch_size: int):
        """Batch ``step`` of the training stream: ``(images [B, 1, 8, 8] float32, labels [B] int64)``, a pure function of (seed, step)."""
        import torch

        idx = np.random.default_rng((self.seed, step)).integers(0, len(self.y_train), size=batch_size)
        return torch.from_numpy(self.x_train[idx]), torch.from_numpy(self.y_train[idx])

    def eval_batches(self, batch_size: int = 128) -> Iterator[np.ndarray]:
        for i in range(0, len(self.y_val), batch_size):
            yield self.x_val[i : i + batch_size]

    def calibration_batches(self, n: int, batch_size: int = 8) -> Iterator[np.ndarray]:
        """Training images for activation calibration (never validation data)."""
        for i in range(n):
            yield self.train_batch(10_000_000 + i, batch_size)[0].numpy()

    def example_inputs(self, batch_size: int = 1) -> np.ndarray:
        return self.x_val[:batch_size]

    def evaluate(self, predict, batch_size: int = 128) -> Metrics:
        """Accuracy (%) and mean cross-entropy (nats) of ``predict`` on the validation split."""
        correct, nll = 0, 0.0
        for i, x in enumerate(self.eval_batches(batch_size)):
            y = self.y_val[i * batch_size : i * batch_size + len(x)]
            logits = np.asarray(predict(x), dtype=np.float64)
            m = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
            nll += float((logz - logits[np.arange(len(y)), y]).sum())
            correct += int((logits.argmax(-1) == y).sum())
        n = len(self.y_val)
        return Metrics(accuracy=100.0 * correct / n, extra={"cross_entropy": nll / n, "eval_samples": float(n)})

    def fingerprint(self) -> str:
        return self._fp

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train_samples": int(len(self.y_train)),
            "eval_samples": int(len(self.y_val)),
            "input_shape": list(self.x_val.shape[1:]),
            "classes": 10,
        }


def make_task(val_fraction: float = 0.2, seed: int = 0) -> DigitsTask:
    return DigitsTask(val_fraction=val_fraction, seed=seed)
