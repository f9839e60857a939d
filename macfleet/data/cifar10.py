"""CIFAR-10 through torchvision's own reader, plus a writer of small CIFAR-format copies.

`build` loads `<root>/cifar-10-batches-py` with `torchvision.datasets.CIFAR10` (downloading
it when `download=true` and the internet is reachable) and keeps the images as one uint8
tensor; normalisation and the usual augmentation (pad-4 random crop, horizontal flip) run per
item in torch. `write_cifar_format` writes the same batch files with synthetic images, so the
recipes' smoke mode and the tests exercise the real reader offline.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Optional

import torch

from macfleet.data import DatasetBundle, TensorPairs, log_built
from macfleet.errors import DatasetMissingError

log = logging.getLogger(__name__)

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the real CIFAR-10 training set.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class Cifar10Augment:
    """Pad-4 random crop + random horizontal flip + normalise, on one uint8 CHW image.

    Draws from torch's global RNG, which the trainer seeds per item (data/loader.py)."""

    def __init__(self, augment: bool, normalize: bool):
        self.augment = augment
        self.normalize = normalize
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().div_(255.0)
        if self.augment:
            _, h, w = x.shape
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = padded[:, top : top + h, left : left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        if self.normalize:
            x = (x - self.mean) / self.std
        return x.contiguous()


def _missing_message(root: Path) -> str:
    return (
        f"CIFAR-10 is not in {root / BASE_FOLDER}. Either put the extracted python batches there "
        f"(data_batch_1..5, test_batch, batches.meta from cifar-10-python.tar.gz, "
        f"https://www.cs.toronto.edu/~kriz/cifar.html), point dataset.root (or MACFLEET_DATA) at the "
        f"folder that holds {BASE_FOLDER}/, or pass dataset.download=true on a machine with internet."
    )


def _torchvision_reader(verify_checksums: bool):
    """torchvision's CIFAR10 class, or a subclass that skips the md5 checks.

    The md5 check stays on by default for the real data; it is switched off for a re-packed
    or reduced copy (and for the synthetic smoke data), whose bytes differ but whose format
    is the same, so torchvision's loading code is still the one that reads it.
    """
    from torchvision.datasets import CIFAR10

    if verify_checksums:
        return CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10


def build(
    root: str = "data",
    download: bool = False,
    augment: bool = True,
    normalize: bool = True,
    verify_checksums: bool = True,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
) -> DatasetBundle:
    """Load CIFAR-10 from `<root>/cifar-10-batches-py` into uint8 tensors.

    Raises DatasetMissingError (saying where to put the files) when they are absent and either
    `download` is false or the download fails. `train_limit` / `test_limit` keep the first N
    items of each split (quick runs on a laptop).
    """
    root_path = Path(os.path.expanduser(str(root))).resolve()
    folder = root_path / BASE_FOLDER
    have_files = all((folder / name).is_file() for name in (*TRAIN_FILES, TEST_FILE, META_FILE))
    if not have_files and not download:
        raise DatasetMissingError(_missing_message(root_path))
    reader = _torchvision_reader(verify_checksums)
    try:
        if download:
            root_path.mkdir(parents=True, exist_ok=True)
        train = reader(str(root_path), train=True, download=bool(download))
        test = reader(str(root_path), train=False, download=False)
    except OSError as exc:  # URLError is an OSError: no internet, DNS, refused
        raise DatasetMissingError(f"downloading CIFAR-10 failed ({exc}). " + _missing_message(root_path)) from exc
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        hint = (
            " The files are there but their md5 differs from the official release; if this is a "
            "re-packed or reduced copy, pass dataset.verify_checksums=false."
            if verify_checksums and have_files
            else ""
        )
        raise DatasetMissingError(f"torchvision could not read CIFAR-10 in {folder}: {exc}.{hint}") from exc

    def to_tensors(split, limit):
        # torchvision keeps HWC uint8 numpy; store CHW uint8 (150 MB for the full train set).
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(split.targets, dtype=torch.int64)
        if limit:
            images, labels = images[: int(limit)], labels[: int(limit)]
        return images, labels

    x_train, y_train = to_tensors(train, train_limit)
    x_test, y_test = to_tensors(test, test_limit)
    return log_built(
        DatasetBundle(
            name="cifar10",
            train=TensorPairs(x_train, y_train, Cifar10Augment(augment=bool(augment), normalize=bool(normalize))),
            test=TensorPairs(x_test, y_test, Cifar10Augment(augment=False, normalize=bool(normalize))),
            task="classification",
            num_classes=len(train.classes),
            input_shape=(3, 32, 32),
            in_channels=3,
        )
    )


def write_cifar_format(root: str | Path, train_per_batch: int = 20, test_size: int = 40, seed: int = 0) -> Path:
    """Write a small CIFAR-10-format copy (5 train batches, test batch, meta) under `root`.

    The images are learnable on purpose: each class has its own mean colour plus noise, so a
    smoke run can show the loss falling. Returns the `cifar-10-batches-py` folder. Files are
    pickled dicts because that *is* the CIFAR-10 file format torchvision reads (on disk, never
    on our wire).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(root) / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(30, 225, size=(len(CLASSES), 3))

    def batch(n: int, label: str) -> dict:
        labels = rng.integers(0, len(CLASSES), size=n)
        noise = rng.normal(0.0, 25.0, size=(n, 3, 32 * 32))
        pixels = np.clip(palette[labels][:, :, None] + noise, 0, 255).astype(np.uint8)
        return {
            "batch_label": label,
            "labels": [int(v) for v in labels],
            "data": pixels.reshape(n, 3 * 32 * 32),
            "filenames": [f"synthetic_{label}_{i}.png" for i in range(n)],
        }

    for i, name in enumerate(TRAIN_FILES, start=1):
        with open(folder / name, "wb") as f:
            pickle.dump(batch(train_per_batch, f"training batch {i} of 5"), f)
    with open(folder / TEST_FILE, "wb") as f:
        pickle.dump(batch(test_size, "testing batch 1 of 1"), f)
    with open(folder / META_FILE, "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": train_per_batch, "num_vis": 3072}, f)
    return folder
