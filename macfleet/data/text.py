"""Text corpora for language modelling: read, tokenize, cut into next-token blocks.

A corpus is the built-in sample (default, offline), a .txt file, a folder of .txt files, a
JSON-lines / JSON file of records with a text field, or (when the `datasets` package is
installed) a Hugging Face dataset saved with `save_to_disk` or named on the Hub. Tokenization
uses the GPT-2 tokenizer from the local Hugging Face cache when it is there and otherwise a
byte-level tokenizer (vocab 256); the log says which one ran, and `tokenizer=gpt2` makes the
GPT-2 one mandatory. Items are `(ids[s:s+T], ids[s+1:s+T+1])` with T = block_size.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from macfleet.data import DatasetBundle, log_built
from macfleet.errors import ConfigError, DatasetMissingError

log = logging.getLogger(__name__)

BYTE_VOCAB = 256
TOKENIZER_NAMES = ("auto", "gpt2", "byte")


class ByteTokenizer:
    """UTF-8 bytes as tokens: needs no files, so text jobs run on any machine."""

    name = "byte"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        if not data:  # frombuffer refuses an empty buffer
            return torch.zeros(0, dtype=torch.uint8)
        # One byte per token straight from the buffer: no Python int per character.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """The GPT-2 BPE tokenizer from the local Hugging Face cache (never downloads here)."""

    name = "gpt2"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_id = hf_tokenizer.eos_token_id

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.hf.encode(text), dtype=torch.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids])


def load_gpt2_tokenizer(name: str = "gpt2") -> Optional[GPT2Tokenizer]:
    """The GPT-2 tokenizer if its files are cached locally, else None.

    Checked by use, not by the absence of an exception: transformers 5 hands back an empty
    tokenizer (vocab 1, encodes everything to []) when the files are missing offline.
    """
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:  # ImportError, OSError, ValueError: all mean "not available here"
        log.debug("GPT-2 tokenizer %r not available locally: %s", name, exc)
        return None
    if len(hf) <= BYTE_VOCAB or not hf.encode("hello world"):
        return None
    # The corpus is tokenized in one call; the model's context limit applies to blocks, not here.
    hf.model_max_length = 1 << 62
    return GPT2Tokenizer(hf)


def make_tokenizer(kind: str = "auto", name: str = "gpt2"):
    """auto: GPT-2 if cached locally else bytes; gpt2: GPT-2 or a clear error; byte: bytes."""
    if kind not in TOKENIZER_NAMES:
        raise ConfigError(f"dataset.tokenizer={kind!r}: choose one of {', '.join(TOKENIZER_NAMES)}")
    if kind == "byte":
        return ByteTokenizer()
    tok = load_gpt2_tokenizer(name)
    if tok is not None:
        return tok
    if kind == "gpt2":
        raise DatasetMissingError(
            f"the {name!r} tokenizer is not in the local Hugging Face cache. Run once with internet "
            f"(python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{name}')\"), "
            f"set HF_HOME to a cache that has it, or use dataset.tokenizer=byte (or auto)."
        )
    log.info("GPT-2 tokenizer not cached locally; using the byte-level tokenizer (vocab %d)", BYTE_VOCAB)
    return ByteTokenizer()


class TokenBlocks(Dataset):
    """Next-token blocks over one 1-D id tensor, stored compact (uint8/int32) and widened to
    int64 per item, so a large corpus costs 1-4 bytes per token in memory, not 8."""

    def __init__(self, ids: torch.Tensor, block_size: int, stride: Optional[int] = None):
        self.ids = ids
        self.block_size = int(block_size)
        self.stride = int(stride or block_size)
        usable = len(ids) - 1 - self.block_size
        self.count = usable // self.stride + 1 if usable >= 0 else 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        start = index * self.stride
        chunk = self.ids[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def _read_records(path: Path, text_field: str) -> list[str]:
    """Texts from a JSON-lines file or a JSON list / {field: [...]} file."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else data.get(text_field, data.get("data", []))
    texts = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            texts.append(rec)
        elif isinstance(rec, dict) and text_field in rec:
            texts.append(str(rec[text_field]))
        else:
            raise ConfigError(f"{path}: record {i} has no {text_field!r} field; set dataset.text_field")
    return texts


def _read_hf(source: str, split: str, text_field: str, hf_config: Optional[str]) -> list[str]:
    """Texts from a Hugging Face dataset (a save_to_disk folder or a Hub name)."""
    try:
        import datasets
    except ImportError:
        raise DatasetMissingError(
            f"reading the Hugging Face dataset {source!r} needs the `datasets` package: pip install datasets "
            f"(or export the corpus to a .txt / .jsonl file and point dataset.path at it)"
        ) from None
    try:
        if Path(source).is_dir():
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, hf_config, split=split)
    except Exception as exc:  # offline hub lookups, missing splits, corrupt folders
        raise DatasetMissingError(
            f"could not load Hugging Face dataset {source!r} (split {split!r}): {exc}. Save it with "
            f"save_to_disk on a machine with internet and point dataset.path at that folder."
        ) from exc
    return [str(t) for t in ds[text_field]]


def read_corpus(
    path: Optional[str], text_field: str = "text", hf_dataset: Optional[str] = None,
    hf_config: Optional[str] = None, split: str = "train", root: Optional[str] = None,
) -> list[str]:
    """The corpus as a list of documents (one for a plain text file).

    A relative `path` that is not found from the working directory is looked up under `root`
    (the data folder, MACFLEET_DATA), so configs can name corpora by their place in it.
    """
    if hf_dataset:
        return _read_hf(hf_dataset, split, text_field, hf_config)
    if path is None:
        from macfleet.data.sample_text import SAMPLE_TEXT

        return [SAMPLE_TEXT]
    p = Path(os.path.expanduser(str(path)))
    if not p.exists() and not p.is_absolute() and root:
        p = Path(os.path.expanduser(str(root))) / p
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return _read_hf(str(p), split, text_field, hf_config)
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise DatasetMissingError(f"no .txt files under {p}; put the corpus there or set dataset.path to a file")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not p.is_file():
        raise DatasetMissingError(
            f"text corpus {path} does not exist (looked in {Path.cwd()}{f' and {root}' if root else ''}). Set dataset.path to a .txt/.jsonl file or a folder of .txt "
            f"files, or leave dataset.path=null to use the built-in sample text."
        )
    if p.suffix in (".jsonl", ".json"):
        return _read_records(p, text_field)
    return [p.read_text(encoding="utf-8", errors="replace")]


def build(
    path: Optional[str] = None,
    block_size: int = 128,
    tokenizer: str = "auto",
    tokenizer_name: str = "gpt2",
    test_fraction: float = 0.1,
    stride: Optional[int] = None,
    max_tokens: Optional[int] = None,
    text_field: str = "text",
    hf_dataset: Optional[str] = None,
    hf_config: Optional[str] = None,
    split: str = "train",
    root: Optional[str] = None,
) -> DatasetBundle:
    """Tokenize a corpus and cut it into next-token blocks (train = head, test = tail).

    `stride` < block_size makes overlapping training blocks (more items from a small text);
    `max_tokens` caps the corpus. A relative `path` is also looked up under `root`.
    """
    if int(block_size) < 1:
        raise ConfigError(f"dataset.block_size={block_size} must be >= 1")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ConfigError(f"dataset.test_fraction={test_fraction} must be in [0, 1)")
    docs = read_corpus(path, text_field, hf_dataset, hf_config, split, root)
    tok = make_tokenizer(tokenizer, tokenizer_name)
    pieces: list[torch.Tensor] = []
    sep = getattr(tok, "eos_id", None)
    total = 0
    for doc in docs:
        ids = tok.encode(doc)
        if sep is not None and len(docs) > 1:
            # GPT-2's <|endoftext|> between documents, as in its pre-training.
            ids = torch.cat([ids, torch.tensor([sep], dtype=ids.dtype)])
        pieces.append(ids)
        total += len(ids)
        if max_tokens and total >= int(max_tokens):
            break
    all_ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8)
    if max_tokens:
        all_ids = all_ids[: int(max_tokens)]
    need = int(block_size) + 1
    n_test = int(len(all_ids) * float(test_fraction))
    if float(test_fraction) > 0 and len(all_ids) >= 2 * need:
        n_test = max(n_test, need)  # a test split smaller than one block would be empty
    else:
        n_test = 0
    train_ids, test_ids = all_ids[: len(all_ids) - n_test], all_ids[len(all_ids) - n_test :]
    train = TokenBlocks(train_ids, block_size, stride)
    if len(train) == 0:
        raise ConfigError(
            f"the corpus has {len(all_ids)} tokens, fewer than one training block of {block_size}+1; "
            f"use a longer text or a smaller dataset.block_size"
        )
    test = TokenBlocks(test_ids, block_size) if n_test else None
    log.info("text corpus: %d documents, %d tokens, tokenizer=%s (vocab %d)", len(docs), len(all_ids), tok.name, tok.vocab_size)
    return log_built(
        DatasetBundle(
            name="text",
            train=train,
            test=test,
            task="lm",
            vocab_size=tok.vocab_size,
            input_shape=(int(block_size),),
        )
    )
