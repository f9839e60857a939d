"""The trainer's input pipeline: a torch DataLoader fed by the weighted batch sampler.

The DataLoader's `batch_sampler` yields this rank's index lists from `WeightedBatchSampler` (the
same lists at every step as the sampler alone), each index paired with its epoch:
`[(epoch, i), ...]`. `SeededBatches` turns one such list into one batch, in a worker process
when `num_workers > 0`:

- tensors in memory without a transform (digits): one indexing op per tensor, no per-item Python;
- anything else: item by item, then `default_collate`. Before item i of epoch e, torch's CPU RNG
  is seeded from (seed, e, i) (blake2b of the three, so neighbouring keys give unrelated
  streams), and the caller's RNG state is put back after the batch. An item's augmentation
  therefore depends on (seed, epoch, index) only: not on the number of workers, on which worker
  or rank fetched it, or on what ran before. A resumed run draws exactly what a straight run
  drew, and there is no data-side RNG state to checkpoint. Only torch's RNG is seeded (what
  torchvision's transforms and ours draw from; seeding Python's `random` and numpy's as well
  would triple the per-item cost): a transform drawing from those is not reproducible.

The DataLoader gets its own `generator`, so starting an epoch's iterator does not draw from the
global RNG that dropout and the rest of the step use.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import DataLoader, Dataset, default_collate


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of item `index`'s randomness in `epoch` of a run seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _tensors(ds):
    """(inputs, targets) when `ds` is tensors in memory with nothing to run per item, else None."""
    tensors = getattr(ds, "tensors", None)
    if tensors is None and hasattr(ds, "inputs") and getattr(ds, "transform", None) is None:
        tensors = (ds.inputs, ds.targets)
    return tensors


def fetch(ds, indices: list[int]):
    """Batch of items `indices` as they are (evaluation, calibration): no seeding."""
    tensors = _tensors(ds)
    if tensors is not None:
        ix = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[ix] for t in tensors)
    return default_collate([ds[i] for i in indices])


class SeededBatches(Dataset):
    """Wraps a map-style dataset: `__getitems__([(epoch, i), ...])` is one collated batch whose
    items are drawn with RNGs seeded from (seed, epoch, i) (see the module docstring)."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys):
        tensors = _tensors(self.dataset)
        if tensors is not None:  # nothing random happens per item
            return fetch(self.dataset, [i for _, i in keys])
        saved = torch.get_rng_state()
        try:
            items = []
            for epoch, i in keys:
                # default_generator, not torch.manual_seed: that would also reseed cuda/mps RNGs.
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
                items.append(self.dataset[i])
        finally:
            torch.set_rng_state(saved)
        return default_collate(items)


class EpochBatches:
    """batch_sampler: the weighted sampler's index lists for its current epoch, as (epoch, i) keys."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        for indices in self.sampler:
            yield [(epoch, i) for i in indices]


def _as_is(batch):
    # SeededBatches already collated; module-level so worker processes can unpickle it.
    return batch


AUTO_WORKERS = 2
"""Workers `trainer.num_workers=auto` starts on an accelerator. Measured on 2 H100s, 16 cores each
(`macfleet benchmark --type scaling`, ResNet-50, CIFAR-format data, batch 256): with 0 workers the
crop and flip of 128 images per step took longer than the GPU's step, so each node alone ran at
49.5 ms a step at its local batch; with 2 workers at 23.8 ms."""


def auto_workers(dataset, device, cores: int | None = None) -> int:
    """What `trainer.num_workers=auto` means for `dataset` on `device`: AUTO_WORKERS on cuda or
    mps when items run per-item code (a transform; in-memory tensors without one are sliced
    whole, with nothing for a worker to do), else 0. On the CPU the model's own compute takes
    the cores a worker would use, as it does on a machine with fewer than 4 cores."""
    if _tensors(dataset) is not None or torch.device(device).type not in ("cuda", "mps"):
        return 0
    if cores is None:
        from macfleet.device import usable_cores

        cores = usable_cores()
    return AUTO_WORKERS if cores >= 4 else 0


def resolve_workers(setting, dataset, device) -> int:
    """trainer.num_workers as a number: `auto` resolved by `auto_workers`."""
    return auto_workers(dataset, device) if setting == "auto" else int(setting)


def drop_inherited_sockets(worker_id: int = 0) -> int:
    """A DataLoader worker's `worker_init_fn`: point every network (IPv4/IPv6) socket the worker
    inherited from its node at /dev/null, and return how many there were.

    On Linux DataLoader workers are forked, and a fork copies every descriptor: the fleet's data
    listener, its connections to peers and the control sockets. The node's copy closing did not
    free them while a worker (persistent: for the whole run) held its own. When a peer was lost,
    the next generation could not listen on its port again ("rank 0 cannot listen on ...: Address
    already in use"), so the run stopped instead of going on without the peer: every elastic
    recovery with `trainer.num_workers` > 0 failed this way (seen on the GPU hosts, where
    `num_workers=auto` starts 2 workers; reproduced on CPU by `macfleet benchmark --type elastic
    --cases kill -- trainer.num_workers=2`). A worker never talks to the network: it reads the
    dataset and hands batches back over pipes (and Unix sockets for shared memory), which are
    left alone. Each descriptor keeps its number (dup2 of /dev/null, not close), so nothing in the
    worker can close a reused number by mistake later. Spawned workers (macOS) inherit none:
    nothing to do."""
    import os
    import socket
    import stat

    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    try:
        fds = sorted(int(name) for name in os.listdir(fd_dir))
    except OSError:
        return 0
    dropped, null = 0, None
    try:
        for fd in fds:
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                sock = socket.socket(fileno=fd)
            except OSError:  # the listing's own descriptor, gone by now; or not a socket we can read
                continue
            try:
                family = sock.family
            finally:
                sock.detach()
            if family in (socket.AF_INET, socket.AF_INET6):
                if null is None:
                    null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, fd)
                dropped += 1
    finally:
        if null is not None:
            os.close(null)
    return dropped


def build_loader(dataset, sampler, seed: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """DataLoader over `dataset` in `sampler`'s batches; `sampler.set_epoch` before each `iter()`.
    Its workers drop the node's network sockets they inherit (`drop_inherited_sockets`)."""
    return DataLoader(
        SeededBatches(dataset, seed),
        batch_sampler=EpochBatches(sampler),
        collate_fn=_as_is,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=drop_inherited_sockets if num_workers > 0 else None,
    )


__all__ = ["SeededBatches", "EpochBatches", "auto_workers", "build_loader", "drop_inherited_sockets", "fetch",
           "resolve_workers", "sample_seed"]
