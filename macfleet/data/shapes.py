"""Shapes: an offline image task harder than digits, drawn by this module (nothing downloaded).

Each 3x32x32 image holds one of ten shapes, at a random place, size and angle, in a random
colour on a random background colour, under pixel noise. Colour, place and angle say nothing
of the class, so a model must learn the outline: the digits CNN (`model=digits_cnn`) needs
several epochs where digits takes one, which is what `macfleet benchmark --type convergence`
needs to show what a lossy codec costs in epochs (`dataset=shapes`).

The same `seed` draws the same images on every node, in every process: nothing is written to
disk. Train and test are drawn from two streams of that seed, so a larger train split keeps the
test split the same.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from macfleet.data import DatasetBundle, TensorPairs, log_built
from macfleet.errors import ConfigError

CLASSES = ("disc", "ring", "square", "frame", "triangle", "bar", "plus", "corner", "half-disc", "two-dots")
"""Shapes that stay themselves under rotation (a square turned 45 degrees is still a square), so
the random angle never turns one class into another."""

MIN_CONTRAST = 0.3
"""The least mean absolute difference between a shape's colour and its background (0..1)."""


def _masks(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which pixels belong to shape `label`, in shape coordinates (u, v): the shape fits the unit
    disc around the origin."""
    d2 = u * u + v * v
    au, av = np.abs(u), np.abs(v)
    name = CLASSES[label]
    if name == "disc":
        return d2 <= 1.0
    if name == "ring":
        return (d2 <= 1.0) & (d2 >= 0.55 ** 2)
    if name == "square":
        return np.maximum(au, av) <= 0.75
    if name == "frame":
        m = np.maximum(au, av)
        return (m <= 0.8) & (m >= 0.45)
    if name == "triangle":  # pointing up before rotation
        return (v >= -0.5) & (au <= (0.9 - v) * 0.62)
    if name == "bar":
        return (av <= 0.22) & (au <= 1.0)
    if name == "plus":
        return ((au <= 0.2) & (av <= 0.9)) | ((av <= 0.2) & (au <= 0.9))
    if name == "corner":
        return ((u >= -0.8) & (u <= -0.4) & (av <= 0.8)) | ((v >= -0.8) & (v <= -0.4) & (au <= 0.8))
    if name == "half-disc":
        return (d2 <= 1.0) & (v >= 0.0)
    return ((u - 0.5) ** 2 + v * v <= 0.35 ** 2) | ((u + 0.5) ** 2 + v * v <= 0.35 ** 2)  # two-dots


def draw(n: int, size: int = 32, noise: float = 0.12, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (n, 3, size, size) float32 in [0, 1] and their labels (n,) int64; `seed`: an int
    or a numpy SeedSequence."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    radius = rng.uniform(0.2, 0.4, size=n) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    angle = rng.uniform(0.0, 2 * math.pi, size=n)
    background = rng.uniform(0.0, 1.0, size=(n, 3))
    colour = rng.uniform(0.0, 1.0, size=(n, 3))
    for _ in range(8):  # draw again where a shape would barely stand out from its background
        dull = np.abs(colour - background).mean(axis=1) < MIN_CONTRAST
        if not dull.any():
            break
        colour[dull] = rng.uniform(0.0, 1.0, size=(int(dull.sum()), 3))
    dull = np.abs(colour - background).mean(axis=1) < MIN_CONTRAST
    colour[dull] = 1.0 - background[dull].round()  # black or white against what is left
    grain = rng.normal(0.0, noise, size=(n, 3, size, size)).astype(np.float32)

    grid = np.arange(size, dtype=np.float64) + 0.5
    dx = (grid[None, None, :] - cx[:, None, None]) / radius[:, None, None]
    dy = (grid[None, :, None] - cy[:, None, None]) / radius[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    mask = np.zeros((n, size, size), dtype=bool)
    for label in range(len(CLASSES)):
        rows = labels == label
        if rows.any():
            mask[rows] = _masks(label, u[rows], v[rows])
    m = mask[:, None, :, :]
    images = np.where(m, colour[:, :, None, None], background[:, :, None, None]).astype(np.float32) + grain
    return torch.from_numpy(np.clip(images, 0.0, 1.0)), torch.from_numpy(labels.astype(np.int64))


def build(root: Optional[str] = None, train_size: int = 6000, test_size: int = 1500, size: int = 32,
          noise: float = 0.12, seed: int = 0, normalize: bool = True) -> DatasetBundle:
    """Draw the train and test splits (see the module docstring); `root` is unused (nothing is
    read or written), accepted so every dataset node has the same shape in conf/."""
    if int(train_size) < 1 or int(test_size) < 1:
        raise ConfigError(f"dataset.train_size={train_size} and dataset.test_size={test_size}: give at least 1 each")
    if int(size) < 8:
        raise ConfigError(f"dataset.size={size}: images need at least 8x8 pixels to show a shape")
    if not 0.0 <= float(noise) <= 1.0:
        raise ConfigError(f"dataset.noise={noise}: give the pixel noise's standard deviation in [0, 1], e.g. 0.12")
    test_stream, train_stream = np.random.SeedSequence(int(seed)).spawn(2)
    x_test, y_test = draw(int(test_size), int(size), float(noise), test_stream)
    x_train, y_train = draw(int(train_size), int(size), float(noise), train_stream)
    if normalize:  # per channel, from the train split alone
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return log_built(
        DatasetBundle(
            name="shapes",
            train=TensorPairs(x_train.contiguous(), y_train),
            test=TensorPairs(x_test.contiguous(), y_test),
            task="classification",
            num_classes=len(CLASSES),
            input_shape=(3, int(size), int(size)),
            in_channels=3,
        )
    )
