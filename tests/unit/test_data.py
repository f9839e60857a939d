"""Dataset builders: digits splits, CIFAR-10 through torchvision's reader, text blocks, clear errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from macfleet.data import DatasetBundle, cifar10, digits, text
from macfleet.data.sample_text import SAMPLE_TEXT
from macfleet.errors import ConfigError, DatasetMissingError


# ---------------------------------------------------------------- digits
def test_digits_split_is_stratified_deterministic_and_normalised():
    a = digits.build(test_fraction=0.2, seed=0)
    b = digits.build(test_fraction=0.2, seed=0)
    c = digits.build(test_fraction=0.2, seed=1)
    assert isinstance(a, DatasetBundle) and a.task == "classification"
    assert (a.num_classes, a.in_channels, a.input_shape) == (10, 1, (1, 8, 8))
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 359  # 20% of each digit, rounded
    x, y = a.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Same seed, same split on every node; another seed, another split.
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.targets, b.test.targets)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    # Stratified: every digit is in the test split with about its share (~36 each).
    counts = torch.bincount(a.test.targets, minlength=10)
    assert counts.min() >= 30 and counts.max() <= 42
    assert abs(a.train.inputs.mean().item()) < 1e-4 and abs(a.train.inputs.std().item() - 1) < 1e-3


def test_digits_are_scikit_learns_read_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    pixels, target = digits._shipped()
    raw = load_digits()
    assert (pixels == raw.data).all() and (target == raw.target).all()
    # A fleet's every process builds the dataset: no sklearn (and scipy) import in it.
    code = "import sys; from macfleet.data import digits; digits.build(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_digits_without_normalize_is_in_unit_range():
    bundle = digits.build(normalize=False)
    assert bundle.train.inputs.min() >= 0 and bundle.train.inputs.max() == 1.0


def test_digits_rejects_bad_test_fraction():
    with pytest.raises(ConfigError, match="test_fraction"):
        digits.build(test_fraction=1.5)


# ---------------------------------------------------------------- cifar10
def test_cifar10_reads_cifar_format_files_with_torchvision(tmp_path):
    folder = cifar10.write_cifar_format(tmp_path, train_per_batch=12, test_size=20, seed=3)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*cifar10.TRAIN_FILES, cifar10.TEST_FILE, cifar10.META_FILE]
    )
    bundle = cifar10.build(root=str(tmp_path), verify_checksums=False, augment=False, normalize=False)
    assert (bundle.name, bundle.task, bundle.num_classes, bundle.in_channels) == ("cifar10", "classification", 10, 3)
    assert len(bundle.train) == 5 * 12 and len(bundle.test) == 20
    # Item 12 is the first image of data_batch_2: compare with the bytes we wrote, row-major CHW.
    with open(folder / "data_batch_2", "rb") as f:
        written = pickle.load(f)
    x, y = bundle.train[12]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = torch.from_numpy(written["data"][0]).float().div(255).view(3, 32, 32)
    assert torch.allclose(x, expected)
    assert y.item() == written["labels"][0]


def test_cifar10_augment_crops_and_flips_but_keeps_shape(tmp_path):
    cifar10.write_cifar_format(tmp_path, train_per_batch=4, test_size=4)
    bundle = cifar10.build(root=tmp_path, verify_checksums=False, augment=True, normalize=True)
    torch.manual_seed(0)
    views = torch.stack([bundle.train[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 32, 32)
    assert not all(torch.equal(views[0], v) for v in views[1:]), "augmentation produced identical views"
    test_views = torch.stack([bundle.test[0][0] for _ in range(3)])
    assert torch.equal(test_views[0], test_views[1]), "the test split must not be augmented"


def test_cifar10_limits_keep_the_first_items(tmp_path):
    cifar10.write_cifar_format(tmp_path, train_per_batch=6, test_size=10)
    bundle = cifar10.build(root=tmp_path, verify_checksums=False, train_limit=7, test_limit=3)
    assert (len(bundle.train), len(bundle.test)) == (7, 3)


def test_cifar10_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetMissingError) as err:
        cifar10.build(root=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "cifar-10-batches-py" in message and "dataset.download=true" in message
    assert str(tmp_path / "nowhere") in message


def test_cifar10_checksum_mismatch_points_at_verify_checksums(tmp_path):
    cifar10.write_cifar_format(tmp_path, train_per_batch=2, test_size=2)
    with pytest.raises(DatasetMissingError, match="verify_checksums=false"):
        cifar10.build(root=tmp_path)  # synthetic bytes differ from the official md5s


# ---------------------------------------------------------------- text
def test_text_default_corpus_blocks_are_shifted_by_one():
    bundle = text.build(block_size=32, tokenizer="byte", test_fraction=0.1)
    assert (bundle.task, bundle.vocab_size, bundle.input_shape) == ("lm", 256, (32,))
    n_tokens = len(SAMPLE_TEXT.encode())
    assert len(bundle.train) > 0 and len(bundle.test) > 0
    assert (len(bundle.train) + len(bundle.test)) * 32 <= n_tokens
    x, y = bundle.train[3]
    assert x.shape == y.shape == (32,) and x.dtype == torch.int64
    assert torch.equal(x[1:], y[:-1])
    # Blocks are consecutive and non-overlapping with the default stride.
    assert torch.equal(bundle.train[4][0][0:1], y[-1:])
    assert text.ByteTokenizer().decode(bundle.train[0][0]) == SAMPLE_TEXT[:32]
    # The test split is the tail of the corpus.
    last_x, last_y = bundle.test[len(bundle.test) - 1]
    assert last_y[-1].item() <= n_tokens and text.ByteTokenizer().decode(last_x)[:5] in SAMPLE_TEXT


def test_text_stride_makes_overlapping_blocks():
    dense = text.build(block_size=16, tokenizer="byte", stride=4, test_fraction=0.0)
    sparse = text.build(block_size=16, tokenizer="byte", test_fraction=0.0)
    assert dense.test is None
    assert len(dense.train) > 3.5 * len(sparse.train)
    assert torch.equal(dense.train[1][0][:12], dense.train[0][0][4:])
    with pytest.raises(IndexError):
        dense.train[len(dense.train)]


def test_text_reads_txt_folder_and_jsonl(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha " * 50)
    (tmp_path / "docs" / "b.txt").write_text("beta " * 50)
    folder = text.build(path=str(tmp_path / "docs"), block_size=8, tokenizer="byte", test_fraction=0.0)
    assert len(folder.train) == (300 + 250 - 1 - 8) // 8 + 1
    records = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"body": f"record number {i} " * 5}) for i in range(20)] + [json.dumps({"body": ""})]
    records.write_text("\n".join(lines))
    bundle = text.build(path=str(records), text_field="body", block_size=8, tokenizer="byte", test_fraction=0.25)
    assert text.ByteTokenizer().decode(bundle.train[0][0]) == "record n"
    assert bundle.train[0][0].dtype == torch.int64 and bundle.train.ids.dtype == torch.uint8  # compact store
    with pytest.raises(ConfigError, match="text_field"):
        text.build(path=str(records), text_field="text", block_size=8, tokenizer="byte")


def test_text_relative_path_is_found_under_root(tmp_path):
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "tiny.txt").write_text("0123456789" * 10)
    bundle = text.build(path="corpora/tiny.txt", root=str(tmp_path), block_size=9, tokenizer="byte", test_fraction=0)
    assert text.ByteTokenizer().decode(bundle.train[1][0]) == "901234567"


def test_text_errors_say_what_to_do(tmp_path):
    with pytest.raises(DatasetMissingError, match="dataset.path") as err:
        text.build(path="missing.txt", root=str(tmp_path))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ConfigError, match="block_size"):
        text.build(block_size=100_000, tokenizer="byte")
    with pytest.raises(ConfigError, match="tokenizer"):
        text.build(tokenizer="sentencepiece")


def test_gpt2_tokenizer_is_used_when_cached_else_byte_fallback():
    cached = text.load_gpt2_tokenizer()
    auto = text.make_tokenizer("auto")
    if cached is None:
        # transformers 5 returns an empty tokenizer offline; we must not mistake it for GPT-2's.
        assert isinstance(auto, text.ByteTokenizer) and auto.vocab_size == 256
        with pytest.raises(DatasetMissingError, match="tokenizer=byte"):
            text.make_tokenizer("gpt2")
    else:
        assert auto.vocab_size == 50257 and auto.decode(auto.encode("hello world")) == "hello world"
    bundle = text.build(block_size=16)
    assert bundle.vocab_size == auto.vocab_size
    assert int(max(bundle.train.ids)) < bundle.vocab_size


# ---------------------------------------------------------------- the trainer's DataLoader
def _loader_batches(ds, weights: list[float], rank: int, epoch: int) -> list:
    from macfleet.data.loader import build_loader
    from macfleet.sampler import WeightedBatchSampler

    sampler = WeightedBatchSampler(len(ds), 10, weights, rank=rank, seed=3)
    sampler.set_epoch(epoch)
    return list(build_loader(ds, sampler, seed=3))


def test_loader_augmentation_depends_on_seed_epoch_and_index_only():
    from macfleet.data import TensorPairs
    from macfleet.data.loader import sample_seed

    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augment = cifar10.Cifar10Augment(augment=True, normalize=True)
    ds = TensorPairs(images, torch.arange(40), augment)  # target = index, to find items again
    before = torch.get_rng_state()
    whole = _loader_batches(ds, [1.0], 0, epoch=1)
    halves = [_loader_batches(ds, [1.0, 1.0], r, epoch=1) for r in range(2)]
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG (dropout's) is left alone
    # Split over two ranks, each item is augmented exactly as in one process's batch.
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), x)
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), y)
    # Item i of epoch e is the transform drawn right after seeding torch from (seed, e, i) ...
    x, y = whole[0]
    torch.default_generator.manual_seed(sample_seed(3, 1, int(y[0])))
    assert torch.equal(augment(images[int(y[0])]), x[0])
    torch.set_rng_state(before)
    # ... and another epoch draws other crops and flips for the same items.
    later = {int(i): img for x2, y2 in _loader_batches(ds, [1.0], 0, epoch=2) for i, img in zip(y2, x2)}
    first = {int(i): img for x1, y1 in whole for i, img in zip(y1, x1)}
    assert any(not torch.equal(first[i], later[i]) for i in first)


# ---------------------------------------------------------------- trainer.num_workers=auto
def test_auto_workers_augment_beside_an_accelerator_only(tmp_path):
    from macfleet.data.loader import AUTO_WORKERS, auto_workers, resolve_workers

    cifar10.write_cifar_format(tmp_path, train_per_batch=4, test_size=4)
    augmented = cifar10.build(root=tmp_path, verify_checksums=False).train  # crop and flip per item
    in_memory = digits.build().train  # tensors sliced whole: nothing for a worker to do
    assert AUTO_WORKERS == 2
    assert auto_workers(augmented, "cuda", cores=16) == auto_workers(augmented, torch.device("mps"), cores=8) == 2
    assert auto_workers(augmented, "cpu", cores=16) == 0  # the model's compute takes those cores
    assert auto_workers(augmented, "cuda", cores=2) == 0
    assert auto_workers(in_memory, "cuda", cores=16) == 0
    assert resolve_workers("auto", augmented, "cpu") == 0 and resolve_workers(3, augmented, "cpu") == 3


def test_num_workers_is_auto_by_default_and_checked():
    from macfleet.config import TrainingConfig

    assert TrainingConfig().num_workers == "auto"
    assert TrainingConfig(num_workers=0).num_workers == 0
    for bad in ("two", -1, True, 1.5):
        with pytest.raises(ConfigError, match=r"trainer.num_workers=.*give auto or a whole number >= 0"):
            TrainingConfig(num_workers=bad)
