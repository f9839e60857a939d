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

from _cluster import add_cluster_args, cluster_config, report
from macfleet import MacFleetError, Trainer, TrainingConfig
from macfleet.data import cifar10
from macfleet.models.resnet import resnet50


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split across nodes by weight")
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine decay, warm-up)")
    p.add_argument("--compression", default="topk_fp16", choices=["none", "fp16", "topk", "topk_fp16"])
    p.add_argument("--topk-ratio", type=float, default=0.1, help="fraction of gradient kept by top-k")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir (needs internet)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "mps", "cuda"])
    p.add_argument("--output-dir", default=None, help="run dir for metrics.json and checkpoints")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: all epochs)")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic CIFAR-format data, 3 steps, offline")
    add_cluster_args(p)
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
            torch.manual_seed(0)
            model = resnet50(num_classes=data.num_classes, in_channels=data.in_channels, cifar_stem=True)
            config = TrainingConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                compression=args.compression,
                topk_ratio=args.topk_ratio,
                optimizer="sgd",
                momentum=0.9,
                weight_decay=5e-4,
                lr_schedule="cosine",
                warmup_steps=0 if args.smoke else 200,
                checkpoint_every=1,
                device=args.device,
                max_steps=args.max_steps,
                output_dir=args.output_dir,
                progress=not args.smoke,
            )
            metrics = Trainer(model, data, config, cluster_config(args)).fit()
        except MacFleetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    report(metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
