"""scikit-learn's 8x8 handwritten digits: the offline default dataset (1797 images, 10 classes).

The data ships inside scikit-learn, so this job runs anywhere without a download; `root` is
accepted only so every dataset node has the same shape in conf/.
"""

from __future__ import annotations

from typing import Optional

import torch

from macfleet.data import DatasetBundle, TensorPairs, log_built
from macfleet.errors import ConfigError


def build(
    root: Optional[str] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    normalize: bool = True,
) -> DatasetBundle:
    """Split the digits into train/test tensors of shape (N, 1, 8, 8), float32, targets int64.

    `test_fraction` is stratified per class so a small test split still holds every digit;
    `seed` fixes the split (every node must build the same one). `normalize` scales pixels
    from 0..16 to mean 0 / std 1 using train-split statistics only.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"dataset.test_fraction={test_fraction} must be in (0, 1), e.g. 0.2")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(raw.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=float(test_fraction),
        random_state=int(seed),
        stratify=raw.target,
    )
    train_idx = torch.as_tensor(train_idx)
    test_idx = torch.as_tensor(test_idx)
    x_train, x_test = images[train_idx], images[test_idx]
    if normalize:
        mean, std = x_train.mean(), x_train.std()
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std
    else:
        # Raw pixel values are 0..16; bring them to 0..1 so learning rates transfer.
        x_train, x_test = x_train / 16.0, x_test / 16.0
    return log_built(
        DatasetBundle(
            name="digits",
            train=TensorPairs(x_train.contiguous(), labels[train_idx]),
            test=TensorPairs(x_test.contiguous(), labels[test_idx]),
            task="classification",
            num_classes=10,
            input_shape=(1, 8, 8),
            in_channels=1,
        )
    )
