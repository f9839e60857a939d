"""torchvision ResNet-18 / ResNet-50, randomly initialised, with an optional CIFAR stem.

`cifar_stem=true` swaps the 7x7 stride-2 stem and its max-pool for one 3x3 stride-1 conv, the
usual change for 32x32 inputs (otherwise the last stage sees 1x1 feature maps).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from macfleet.models import log_built


def _build(arch: str, num_classes: Optional[int], in_channels: Optional[int], cifar_stem: bool,
           zero_init_residual: bool) -> nn.Module:
    import torchvision

    in_channels = int(in_channels or 3)
    model = getattr(torchvision.models, arch)(
        weights=None, num_classes=int(num_classes or 1000), zero_init_residual=bool(zero_init_residual)
    )
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # torchvision initialises conv1 with kaiming_normal (fan_out); keep the replacement alike.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return log_built(f"{arch}{' (cifar stem)' if cifar_stem else ''}", model)


def resnet18(num_classes: Optional[int] = None, in_channels: Optional[int] = None, cifar_stem: bool = True,
             zero_init_residual: bool = False) -> nn.Module:
    """torchvision resnet18(weights=None); num_classes defaults to 1000, in_channels to 3."""
    return _build("resnet18", num_classes, in_channels, cifar_stem, zero_init_residual)


def resnet50(num_classes: Optional[int] = None, in_channels: Optional[int] = None, cifar_stem: bool = True,
             zero_init_residual: bool = False) -> nn.Module:
    """torchvision resnet50(weights=None); num_classes defaults to 1000, in_channels to 3."""
    return _build("resnet50", num_classes, in_channels, cifar_stem, zero_init_residual)
