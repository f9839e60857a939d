"""Models: builders named by `_target_` in conf/model/*.yaml, one module per family.

Builders take `num_classes` / `in_channels` (classification) or `vocab_size` (lm) as
optional arguments: the YAML leaves them null and the run fills them from the DatasetBundle.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def log_built(name: str, model: nn.Module) -> nn.Module:
    """Log the one line the style asks for per built object, and hand the model back."""
    params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters", name, params / 1e6)
    return model


__all__ = ["log_built"]
