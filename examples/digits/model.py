"""The model factory a recipe names as ``student: {torch: "examples.digits.model:make_cnn", checkpoint: ...}``."""

from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks (8x8 -> 8x8 -> 4x4 -> 2x2) and a linear classifier: ``[B, 1, 8, 8] -> [B, 10]`` logits."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(c3 * 2 * 2, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def make_cnn() -> DigitsCNN:
    """The unpruned architecture; a pruned checkpoint is loaded into it by resizing its layers to the saved shapes."""
    return DigitsCNN()
