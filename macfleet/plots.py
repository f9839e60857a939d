"""Training curves as a PNG next to metrics.json (matplotlib, imported lazily: optional)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("macfleet")


def plot_history(history: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Loss, test metric and throughput against step; None (and a debug line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.debug("matplotlib not installed: no curves.png (pip install 'macfleet[plot]')")
        return None
    train = [h for h in history if "train/loss" in h]
    test = [h for h in history if any(k.startswith("test/") for k in h)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([h["step"] for h in train], [h["train/loss"] for h in train], label="train loss")
    if test and "test/loss" in test[0]:
        axes[0].plot([h["step"] for h in test], [h["test/loss"] for h in test], "o-", label="test loss")
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    key = next((k for k in ("test/accuracy", "test/perplexity") if test and k in test[0]), None)
    if key:
        axes[1].plot([h["step"] for h in test], [h[key] for h in test], "o-")
    axes[1].set_title(key or "no test set")
    axes[1].set_xlabel("step")
    axes[2].plot([h["step"] for h in train], [h.get("samples_per_s", 0) for h in train])
    axes[2].set_title("samples/s (global)")
    axes[2].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
