"""A small CNN with batch norm for two-class 3x32x32 images, and synthetic CIFAR-2-like data."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "synthetic_cifar2"]


class SmallCNN(nn.Module):
    """(conv-BN-ReLU-maxpool) x 2, then a linear classifier."""

    def __init__(self, num_classes: int = 2, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def synthetic_cifar2(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images [n, 3, 32, 32] (float32) and labels in {0, 1}.

    Each class has its own smooth colour pattern; noise makes the task non-trivial.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    patterns = torch.stack(
        [
            torch.stack([xx, yy, xx * yy]),
            torch.stack([yy.abs(), -xx, (xx**2 + yy**2).sqrt() - 0.5]),
        ]
    )
    x = patterns[y] + 0.8 * torch.randn(n, 3, 32, 32, generator=g)
    return x.float(), y
