"""Datasets: each builder returns a `DatasetBundle` (train/test splits plus what the model needs).

Builders live one per module (`digits`, `cifar10`, `text`) and are named by `_target_` in
conf/dataset/*.yaml. Small datasets are kept as preloaded tensors so a DataLoader with
num_workers=0 never waits on Python-level decoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


@dataclass
class DatasetBundle:
    """Everything the trainer and the model builder need to know about one dataset."""

    name: str
    """Short name used in logs and metrics (digits, cifar10, text)."""
    train: Dataset
    """Map-style dataset; items are (input_tensor, target_tensor)."""
    test: Optional[Dataset]
    """Held-out split, or None when the dataset has none."""
    task: str
    """classification (cross-entropy, accuracy) | lm (token cross-entropy, perplexity) | custom
    (the Trainer's `loss_fn`; the test metric is that loss)."""
    num_classes: Optional[int] = None
    """Number of classes (classification)."""
    vocab_size: Optional[int] = None
    """Tokenizer vocabulary size (lm)."""
    input_shape: Optional[tuple] = None
    """Shape of one input item, e.g. (1, 8, 8) or (block_size,)."""
    in_channels: Optional[int] = None
    """Image channels (classification on images); fills a model's `in_channels`."""

    def __post_init__(self) -> None:
        if self.task not in ("classification", "lm", "custom"):
            raise ValueError(f"DatasetBundle.task={self.task!r}: must be classification, lm or custom")

    def describe(self) -> str:
        """One log line: name, sizes and the numbers a model builder takes from us."""
        test_len = len(self.test) if self.test is not None else 0
        extra = f"classes={self.num_classes}" if self.task == "classification" else f"vocab={self.vocab_size}"
        return (
            f"dataset {self.name}: task={self.task} train={len(self.train)} test={test_len} "
            f"input={self.input_shape} {extra}"
        )


class TensorPairs(Dataset):
    """(inputs[i], targets[i]) over two preloaded tensors, with an optional per-item transform.

    Like torch's TensorDataset, plus a transform hook (CIFAR augmentation) that runs on a
    single item so the stored tensor can stay compact (uint8) in memory.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, transform=None):
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        x = self.inputs[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]


def log_built(bundle: DatasetBundle) -> DatasetBundle:
    """Log the one line the style asks for per built object, and hand the bundle back."""
    log.info(bundle.describe())
    return bundle


__all__ = ["DatasetBundle", "TensorPairs", "log_built"]
