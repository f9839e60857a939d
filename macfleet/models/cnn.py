"""A small CNN for the 8x8 digits job: trains to >= 95% test accuracy in seconds on a CPU."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from macfleet.errors import ConfigError
from macfleet.models import log_built


class DigitsCNN(nn.Module):
    """conv-conv-pool-conv, then a two-layer head; any input size (adaptive pooling to 4x4)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, dropout: float = 0.1,
                 batchnorm: bool = True, pools: int = 0):
        super().__init__()
        # batchnorm=false (with dropout=0) makes a model whose N-node gradient equals one process's
        # exactly: BatchNorm computes per-node statistics, as under PyTorch DDP.
        norm = nn.BatchNorm2d if batchnorm else (lambda c: nn.Identity())
        layers = [nn.Conv2d(in_channels, width, 3, padding=1), norm(width), nn.ReLU(inplace=True)]
        if pools >= 1:  # halve the image before the second conv: it sees 4x the area
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(inplace=True)]
        for _ in range(pools - 1):  # each further pool: halve again, then one more conv
            layers += [nn.MaxPool2d(2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), norm(2 * width),
                       nn.ReLU(inplace=True)]
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, 4 * width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(
    num_classes: Optional[int] = None, in_channels: Optional[int] = None, width: int = 32, dropout: float = 0.1,
    batchnorm: bool = True, pools: int = 0,
) -> DigitsCNN:
    """DigitsCNN; num_classes defaults to 10 and in_channels to 1 (the digits dataset). `pools`:
    max-pooling stages between convolutions (0 for 8x8 digits; 2 for 32x32 images such as
    dataset=shapes, where two convolutions at full size see only 5x5 pixels)."""
    if int(pools) < 0 or int(pools) > 4:
        raise ConfigError(f"model.pools={pools}: give 0 to 4 pooling stages (2 for 32x32 images)")
    return log_built("digits_cnn", DigitsCNN(in_channels or 1, num_classes or 10, int(width), float(dropout),
                                             bool(batchnorm), int(pools)))
