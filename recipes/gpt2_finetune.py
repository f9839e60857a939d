"""Fine-tune GPT-2 (124M) on a text corpus, data-parallel across Macs. Fork this file and edit it.

    # one Mac: pretrained weights and tokenizer from the Hugging Face cache (or the internet)
    python recipes/gpt2_finetune.py --text my_corpus.txt --epochs 3
    # two Macs over Thunderbolt
    mac1$ python recipes/gpt2_finetune.py --text corpus.txt --role master --nodes 2 --master-addr 10.0.0.1
    mac2$ python recipes/gpt2_finetune.py --text corpus.txt --role worker --master-addr 10.0.0.1
    # offline smoke test: a tiny GPT-2 on the built-in sample text, a few steps
    python recipes/gpt2_finetune.py --smoke

--text takes a .txt file, a folder of .txt files or a .jsonl of {"text": ...} records (see
macfleet/data/text.py). The Hydra equivalent is `python train.py model=gpt2 dataset=text
model.pretrained=true dataset.tokenizer=gpt2 dataset.path=corpus.txt optimizer=adamw`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

import torch

from _cluster import add_cluster_args, cluster_config, report
from macfleet import MacFleetError, Trainer, TrainingConfig
from macfleet.data import text
from macfleet.models import gpt2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="global batch of blocks, split across nodes")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (warm-up, cosine decay)")
    p.add_argument("--compression", default="fp16", choices=["none", "fp16", "topk", "topk_fp16"])
    p.add_argument("--topk-ratio", type=float, default=0.1)
    p.add_argument("--text", default=None, help="corpus: .txt, folder of .txt, or .jsonl (default: built-in sample)")
    p.add_argument("--data-dir", default=None, help="alias for --text, for symmetry with the other recipe")
    p.add_argument("--block-size", type=int, default=256, help="tokens per training block")
    p.add_argument("--scratch", action="store_true", help="random init instead of the pretrained weights")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "mps", "cuda"])
    p.add_argument("--output-dir", default=None)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny GPT-2, built-in text, a few steps, offline")
    add_cluster_args(p)
    return p.parse_args(argv)


def build(args):
    """Data and model; the smoke mode swaps in a tiny GPT-2 on byte tokens (same run everywhere)."""
    if args.smoke:
        data = text.build(path=args.text or args.data_dir, block_size=64, tokenizer="byte")
        model = gpt2.build(vocab_size=data.vocab_size, n_layer=2, n_head=2, n_embd=64, n_positions=128, dropout=0.0)
        return data, model
    # Pretrained weights only make sense with the tokenizer they were trained with.
    data = text.build(path=args.text or args.data_dir, block_size=args.block_size,
                      tokenizer="auto" if args.scratch else "gpt2")
    model = gpt2.build(vocab_size=data.vocab_size, pretrained=not args.scratch)
    return data, model


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    with tempfile.TemporaryDirectory(prefix="macfleet-smoke-") as tmp:
        if args.smoke:
            args.max_steps, args.epochs, args.lr = 12, 4, 3e-3
            args.output_dir = args.output_dir or f"{tmp}/run"
        try:
            torch.manual_seed(0)
            data, model = build(args)
            config = TrainingConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                compression=args.compression,
                topk_ratio=args.topk_ratio,
                optimizer="adamw",
                weight_decay=0.01,
                lr_schedule="cosine",
                warmup_steps=0 if args.smoke else 100,
                grad_clip=1.0,
                checkpoint_every=1,
                eval_batch_size=8,
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
