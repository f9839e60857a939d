"""GPT-2 (transformers' GPT2LMHeadModel) behind a plain `forward(input_ids) -> logits` module.

The trainer computes the loss itself (cross entropy over flattened logits for task "lm"), so
the wrapper returns the (B, T, V) logits tensor, not a ModelOutput, and turns off the KV
cache that training never reads. `pretrained=true` loads Hugging Face weights where they are
reachable (cache or internet) and otherwise raises a MacFleetError saying how to get them.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from macfleet.errors import ConfigError, MacFleetError
from macfleet.models import log_built

log = logging.getLogger(__name__)

GPT2_VOCAB = 50257


class GPT2(nn.Module):
    """Causal LM: input_ids (B, T) int64 -> logits (B, T, V)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.n_positions = int(lm.config.n_positions)
        self.vocab_size = int(lm.config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] > self.n_positions:
            raise ConfigError(
                f"sequence length {input_ids.shape[-1]} exceeds the model's n_positions={self.n_positions}; "
                f"lower dataset.block_size or raise model.n_positions"
            )
        return self.lm(input_ids=input_ids, use_cache=False).logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 1.0) -> torch.Tensor:
        """Sample continuations (for eyeballing a fine-tune); no KV cache, fine for short outputs."""
        ids = input_ids
        for _ in range(int(max_new_tokens)):
            logits = self(ids[:, -self.n_positions :])[:, -1, :] / max(float(temperature), 1e-6)
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
        return ids


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Can we open a TCP connection to the Hugging Face endpoint? (DNS + connect, no request)"""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
        if constants.HF_HUB_OFFLINE:
            return False
    except ImportError:
        endpoint = urlparse("https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_pretrained(model_name: str, attn_implementation: str, local_files_only: bool) -> nn.Module:
    """Weights from the local cache first; then from the Hub if it answers within seconds.

    Without the probe, an offline machine spends ~30 s in huggingface_hub's retries before
    the same error.
    """
    from transformers import GPT2LMHeadModel

    def load(local_only: bool):
        return GPT2LMHeadModel.from_pretrained(
            model_name, attn_implementation=attn_implementation, local_files_only=local_only
        )

    reason = "not in the local Hugging Face cache"
    try:
        return load(True)
    except (OSError, ValueError) as exc:
        log.debug("%s not cached: %s", model_name, exc)
    if not local_files_only:
        if _hub_reachable():
            try:
                return load(False)
            except (OSError, ValueError) as exc:  # bad name, interrupted download
                reason = str(exc).rstrip(". ")
        else:
            reason += " and the Hugging Face Hub is unreachable"
    raise MacFleetError(
        f"could not load pretrained weights {model_name!r}: {reason}. Run once on a machine with internet "
        f"to fill the cache (or copy ~/.cache/huggingface, or set HF_HOME to a cache that has it), or "
        f"pass model.pretrained=false to train from scratch."
    )


def build(
    vocab_size: Optional[int] = None,
    n_layer: int = 12,
    n_head: int = 12,
    n_embd: int = 768,
    n_positions: int = 1024,
    dropout: float = 0.1,
    pretrained: bool = False,
    model_name: str = "gpt2",
    local_files_only: bool = False,
    attn_implementation: str = "eager",
    gradient_checkpointing: bool = False,
) -> GPT2:
    """GPT-2 of the given shape (defaults: the 124M model), or `model_name`'s pretrained weights.

    `attn_implementation` is "eager" by default because it runs everywhere (cpu, mps, cuda);
    "sdpa" is faster where the backend supports it. With `pretrained`, the shape arguments
    are ignored and `vocab_size` must be null or the checkpoint's vocabulary (the dataset must
    use the GPT-2 tokenizer).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if pretrained:
        lm = _load_pretrained(model_name, attn_implementation, local_files_only)
        if vocab_size is not None and int(vocab_size) != lm.config.vocab_size:
            raise ConfigError(
                f"pretrained {model_name!r} has vocab {lm.config.vocab_size} but the dataset's tokenizer has "
                f"{vocab_size}; use dataset.tokenizer=gpt2 (cached tokenizer) or model.pretrained=false"
            )
        lm.config.use_cache = False
    else:
        if int(n_embd) % int(n_head):
            raise ConfigError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
        vocab = int(vocab_size or GPT2_VOCAB)
        # GPT-2's <|endoftext|> id (50256) only exists in its own vocabulary.
        special = GPT2_VOCAB - 1 if vocab >= GPT2_VOCAB else None
        config = GPT2Config(
            vocab_size=vocab,
            n_layer=int(n_layer),
            n_head=int(n_head),
            n_embd=int(n_embd),
            n_positions=int(n_positions),
            resid_pdrop=float(dropout),
            embd_pdrop=float(dropout),
            attn_pdrop=float(dropout),
            bos_token_id=special,
            eos_token_id=special,
            use_cache=False,
        )
        config._attn_implementation = attn_implementation
        lm = GPT2LMHeadModel(config)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    model = GPT2(lm)
    return log_built(f"{model_name if pretrained else 'gpt2'} (layers={lm.config.n_layer}, d={lm.config.n_embd}, "
                     f"vocab={lm.config.vocab_size})", model)
