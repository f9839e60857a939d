"""dataset=shapes: the offline image task drawn in memory (macfleet/data/shapes.py)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from macfleet.data.shapes import CLASSES, build
from macfleet.errors import ConfigError
from tests.unit.test_models import compose_config


def test_same_seed_same_images_and_test_split_independent_of_train_size():
    a, b = build(train_size=300, test_size=100), build(train_size=300, test_size=100)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.targets, b.test.targets)
    raw, bigger = build(train_size=300, test_size=100, normalize=False), build(train_size=600, test_size=100, normalize=False)
    assert torch.equal(bigger.test.inputs, raw.test.inputs)  # one test split for every train size (before normalising)
    assert torch.equal(bigger.test.targets, a.test.targets)
    other = build(train_size=300, test_size=100, seed=1)
    assert not torch.equal(other.train.inputs, a.train.inputs)


def test_images_labels_and_normalisation():
    d = build(train_size=2000, test_size=200)
    assert d.name == "shapes" and d.num_classes == len(CLASSES) == 10 and d.in_channels == 3
    assert d.train.inputs.shape == (2000, 3, 32, 32) and d.train.inputs.dtype == torch.float32
    assert d.train.targets.dtype == torch.int64 and set(d.train.targets.tolist()) == set(range(10))
    mean, std = d.train.inputs.mean(dim=(0, 2, 3)), d.train.inputs.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4) and torch.allclose(std, torch.ones(3), atol=1e-3)
    raw = build(train_size=50, test_size=10, normalize=False, size=16)
    assert raw.train.inputs.shape == (50, 3, 16, 16) and raw.train.inputs.min() >= 0 and raw.train.inputs.max() <= 1


def test_colour_says_nothing_of_the_class():
    """A nearest-centroid classifier on each image's mean colour stays near chance (0.1)."""
    d = build(train_size=3000, test_size=1000, normalize=False)
    feats = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    centroids = torch.stack([feats(d.train.inputs[d.train.targets == c]).mean(0) for c in range(10)])
    guess = torch.cdist(feats(d.test.inputs), centroids).argmin(1)
    assert (guess == d.test.targets).float().mean() < 0.2


@pytest.mark.parametrize("kwargs, said", [
    ({"train_size": 0}, "dataset.train_size=0"),
    ({"size": 4}, "dataset.size=4: images need at least 8x8"),
    ({"noise": 2.0}, "dataset.noise=2.0"),
])
def test_bad_settings_say_what_to_give(kwargs, said):
    with pytest.raises(ConfigError, match=said):
        build(**kwargs)


def test_hydra_composes_dataset_shapes():
    cfg = compose_config("dataset=shapes", "dataset.train_size=40", "dataset.test_size=20")
    d = instantiate(cfg.dataset)
    assert (len(d.train), len(d.test), d.input_shape) == (40, 20, (3, 32, 32))
