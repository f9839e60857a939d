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

from _shared import add_common_args, fit_and_report, training_config
from macfleet import MacFleetError
from macfleet.data import text
from macfleet.models import gpt2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, epochs=3, batch_size=16, lr=1e-4, compression="fp16")
    p.add_argument("--text", "--data-dir", dest="text", default=None,
                   help="corpus: .txt, folder of .txt, or .jsonl (default: the built-in sample)")
    p.add_argument("--block-size", type=int, default=256, help="tokens per training block")
    p.add_argument("--scratch", action="store_true", help="random init instead of the pretrained weights")
    return p.parse_args(argv)


def build(args):
    """Data and model; the smoke mode swaps in a tiny GPT-2 on byte tokens (same run everywhere)."""
    if args.smoke:
        data = text.build(path=args.text, block_size=64, tokenizer="byte")
        model = gpt2.build(vocab_size=data.vocab_size, n_layer=2, n_head=2, n_embd=64, n_positions=128, dropout=0.0)
        return data, model
    # Pretrained weights only make sense with the tokenizer they were trained with.
    data = text.build(path=args.text, block_size=args.block_size, tokenizer="auto" if args.scratch else "gpt2")
    model = gpt2.build(vocab_size=data.vocab_size, pretrained=not args.scratch)
    return data, model


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    with tempfile.TemporaryDirectory(prefix="macfleet-smoke-") as tmp:
        if args.smoke:
            args.max_steps, args.epochs, args.lr = 12, 4, 3e-3
            args.output_dir = args.output_dir or f"{tmp}/run"
        torch.manual_seed(0)
        try:
            data, model = build(args)
        except MacFleetError as exc:
            print(f"error: {exc} (recipe flags: --text, --scratch)", file=sys.stderr)
            return 1
        config = training_config(
            args,
            optimizer="adamw",
            weight_decay=0.01,
            lr_schedule="cosine",
            warmup_steps=0 if args.smoke else 100,
            grad_clip=1.0,
            checkpoint_every=1,
            eval_batch_size=8,
        )
        return fit_and_report(model, data, config, args)


if __name__ == "__main__":
    sys.exit(main())
