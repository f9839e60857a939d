"""The tiny GPT-2 config learns the built-in text: composed from conf/, trained in a real loop."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from macfleet.config import register_configs

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def mean_loss(model, dataset) -> float:
    model.eval()
    x, y = (torch.stack(t) for t in zip(*(dataset[i] for i in range(len(dataset)))))
    with torch.no_grad():
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def test_gpt2_tiny_lowers_its_loss_on_the_sample_text():
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=gpt2_tiny", "dataset=text", "dataset.tokenizer=byte"])
    torch.manual_seed(0)
    bundle = instantiate(cfg.dataset)
    model = instantiate(cfg.model, vocab_size=bundle.vocab_size)
    assert sum(p.numel() for p in model.parameters()) < 500_000, "gpt2_tiny must stay tiny"

    before_train, before_test = mean_loss(model, bundle.train), mean_loss(model, bundle.test)
    assert abs(before_train - math.log(bundle.vocab_size)) < 0.5  # untrained: about uniform

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=16, shuffle=True)
    for _ in range(6):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            logits = model(x)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
            opt.step()

    after_train, after_test = mean_loss(model, bundle.train), mean_loss(model, bundle.test)
    # From ~5.5 nats (uniform over bytes) to about 3 (measured: 2.97 train, 2.98 test); the
    # margins leave room for other thread counts and BLAS orderings.
    assert after_train < min(before_train - 1.5, 4.0), (before_train, after_train)
    assert after_test < min(before_test - 1.5, 4.0), (before_test, after_test)
