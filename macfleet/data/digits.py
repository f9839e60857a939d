"""scikit-learn's 8x8 handwritten digits: the offline default dataset (1797 images, 10 classes).

The data ships inside scikit-learn, so this job runs anywhere without a download; `root` is
accepted only so every dataset node has the same shape in conf/. The shipped file is read
directly: importing sklearn.datasets (it pulls in scipy) costs about a second in every process
of a fleet, more than the job's first epoch. The split is this module's own, stratified and seeded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
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
    pixels, targets = _shipped()
    images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(targets, dtype=torch.int64)
    train_idx, test_idx = stratified_split(labels, float(test_fraction), int(seed))
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


def _shipped() -> tuple[np.ndarray, np.ndarray]:
    """(pixels (1797, 64), digit (1797,)) from the digits.csv.gz scikit-learn ships, without
    importing scikit-learn; through sklearn.datasets where the file is not where it used to be."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ConfigError("dataset=digits reads the digits scikit-learn ships: pip install scikit-learn")
    for root in spec.submodule_search_locations or []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.data, raw.target


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices): `test_fraction` of every class, at least one item of each
    class on each side where the class has two; drawn with `seed` (the same split on every node)."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    # One shuffled order, as a shuffled split would give (not class by class).
    return (train_idx[torch.randperm(len(train_idx), generator=gen)],
            test_idx[torch.randperm(len(test_idx), generator=gen)])
