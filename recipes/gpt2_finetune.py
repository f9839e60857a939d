"""Fine-tune GPT-2 (124M) on a text corpus, data-parallel across Macs. Fork this file and edit it.

    # one Mac: pretrained weights and tokenizer from the Hugging Face cache (or the internet)
    python recipes/gpt2_finetune.py dataset.path=my_corpus.txt trainer.epochs=3
    # from scratch, with whatever tokenizer is there (GPT-2's where cached, else bytes)
    python recipes/gpt2_finetune.py dataset.path=my_corpus.txt model.pretrained=false dataset.tokenizer=auto
    # two Macs over Thunderbolt (conf/cluster/pro_air.yaml)
    mac1$ python recipes/gpt2_finetune.py dataset.path=corpus.txt cluster=pro_air cluster.role=master
    mac2$ python recipes/gpt2_finetune.py dataset.path=corpus.txt cluster=pro_air cluster.role=worker
    # offline smoke test: a tiny GPT-2 on the built-in sample text, a few steps
    python recipes/gpt2_finetune.py --smoke

dataset.path takes a .txt file, a folder of .txt files or a .jsonl of {"text": ...} records (see
conf/dataset/text.yaml). The job is conf/experiment/gpt2_finetune.yaml on one process, so `python
train.py experiment=gpt2_finetune cluster=single` runs the same; any of train.py's overrides works here.
"""

from __future__ import annotations

import sys

from _shared import main

OVERRIDES = ["experiment=gpt2_finetune", "cluster=single"]
"""The recipe: train.py's config with these overrides, then the command line's."""


def smoke(tmp: str) -> list[str]:
    """Seconds, offline: a tiny GPT-2 on byte tokens of the built-in sample text."""
    return ["model=gpt2_tiny", "model.pretrained=false", "dataset.tokenizer=byte", "dataset.block_size=64",
            "trainer.epochs=4", "trainer.max_steps=12", "trainer.learning_rate=3e-3", "scheduler.warmup_steps=0"]


if __name__ == "__main__":
    sys.exit(main(OVERRIDES, smoke, sys.argv[1:], __doc__))
