"""ResNet-50 on CIFAR-10, data-parallel across Macs. Fork this file and edit it.

    # one Mac (CIFAR-10 in ~/data/cifar-10-batches-py, or add --download on a machine with internet)
    python recipes/resnet50_cifar10.py --data-dir ~/data --epochs 30
    # two Macs over Thunderbolt: the master waits for the worker, then both train
    mac1$ python recipes/resnet50_cifar10.py --role master --nodes 2 --master-addr 10.0.0.1
    mac2$ python recipes/resnet50_cifar10.py --role worker --master-addr 10.0.0.1
    # offline smoke test: a tiny synthetic CIFAR-format dataset, a few steps
    python recipes/resnet50_cifar10.py --smoke

The Hydra equivalent is `python train.py model=resnet50 dataset=cifar10 compression=topk_fp16`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

import torch

from _shared import add_common_args, fit_and_report, training_config
from macfleet import MacFleetError
from macfleet.data import cifar10
from macfleet.models.resnet import resnet50


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, epochs=30, batch_size=256, lr=0.1, compression="topk_fp16")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir (needs internet)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    with tempfile.TemporaryDirectory(prefix="macfleet-smoke-") as tmp:
        if args.smoke:
            # Real torchvision reader on files in the real format; only the pixels are synthetic.
            cifar10.write_cifar_format(tmp, train_per_batch=8, test_size=16)
            args.data_dir, args.batch_size, args.max_steps, args.epochs = tmp, min(args.batch_size, 8), 3, 1
            args.output_dir = args.output_dir or f"{tmp}/run"
        try:
            data = cifar10.build(root=args.data_dir, download=args.download, verify_checksums=not args.smoke)
        except MacFleetError as exc:
            print(f"error: {exc} (recipe flags: --data-dir, --download)", file=sys.stderr)
            return 1
        torch.manual_seed(0)
        model = resnet50(num_classes=data.num_classes, in_channels=data.in_channels, cifar_stem=True)
        config = training_config(
            args,
            optimizer="sgd",
            momentum=0.9,
            weight_decay=5e-4,
            lr_schedule="cosine",
            warmup_steps=0 if args.smoke else 200,
            checkpoint_every=1,
        )
        return fit_and_report(model, data, config, args)


if __name__ == "__main__":
    sys.exit(main())
