"""ResNet-50 on CIFAR-10, data-parallel across Macs. Fork this file and edit it.

    # one Mac; CIFAR-10 in data/cifar-10-batches-py/ (dataset.download=true fetches it: internet)
    python recipes/resnet50_cifar10.py dataset.root=$HOME/data trainer.epochs=30
    # two Macs over Thunderbolt (conf/cluster/pro_air.yaml): the master waits for the worker
    mac1$ python recipes/resnet50_cifar10.py cluster=pro_air cluster.role=master
    mac2$ python recipes/resnet50_cifar10.py cluster=pro_air cluster.role=worker
    # offline smoke test: a tiny synthetic CIFAR-format dataset, a few steps
    python recipes/resnet50_cifar10.py --smoke

The job is conf/experiment/resnet50_cifar10.yaml on one process, so `python train.py
experiment=resnet50_cifar10 cluster=single` runs the same; any of train.py's overrides works here.
"""

from __future__ import annotations

import sys

from _shared import main

OVERRIDES = ["experiment=resnet50_cifar10", "cluster=single"]
"""The recipe: train.py's config with these overrides, then the command line's."""


def smoke(tmp: str) -> list[str]:
    """Seconds, offline: torchvision's real CIFAR-10 reader on synthetic files in the real format."""
    from macfleet.data.cifar10 import write_cifar_format

    write_cifar_format(tmp, train_per_batch=8, test_size=16)
    return [f"dataset.root={tmp}", "dataset.verify_checksums=false", "trainer.batch_size=8", "trainer.epochs=1",
            "trainer.max_steps=3", "scheduler.warmup_steps=0"]


if __name__ == "__main__":
    sys.exit(main(OVERRIDES, smoke, sys.argv[1:], __doc__))
