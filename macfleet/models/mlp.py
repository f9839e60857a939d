"""A wide MLP for image classification: many parameters, little compute per sample.

Its gradient is large beside the time backward takes (hidden=4096, depth=2: 17M parameters, 68
MB of fp32 gradients a step, against about 100 MFLOP a sample), the case where the link, not
the compute, bounds a fleet's step and gradient compression decides the run: what
`macfleet benchmark --type convergence --rate 1gbit model=mlp` measures on a small CPU machine.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from macfleet.errors import ConfigError
from macfleet.models import log_built


def build(num_classes: Optional[int] = None, in_channels: Optional[int] = None, hidden: int = 4096,
          depth: int = 2, side: int = 8) -> nn.Module:
    """Images average-pooled to side x side, flattened, then `depth` hidden layers of `hidden`
    units with ReLU, then the classifier. num_classes defaults to 10, in_channels to 1."""
    hidden, depth, side = int(hidden), int(depth), int(side)
    if hidden < 1 or depth < 1 or side < 1:
        raise ConfigError(f"model=mlp: hidden={hidden}, depth={depth} and side={side} must all be >= 1")
    width = int(in_channels or 1) * side * side
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(side), nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, int(num_classes or 10)))
    return log_built(f"mlp ({depth} x {hidden})", nn.Sequential(*layers))
