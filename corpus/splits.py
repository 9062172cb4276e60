"""From a DataConfig to the two token arrays a run trains and validates on, and from a checkpoint's recorded data
config back to the validation split (what inference and the benchmarks score perplexity on)."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken

from corpus.documents import shakespeare_plays, split_documents, text_documents, tokenize_cached
from corpus.tokenizer import HELD_OUT_PLAYS, get_tokenizer

SOURCES = ("shakespeare", "textfile")


@dataclass
class DataConfig:
    """Where the text comes from (conf/data/*.yaml). A number's metadata declares its valid range, which the
    config holding this group checks (toymodel/ranges.py)."""

    source: str = "shakespeare"  # shakespeare | textfile
    path: str | None = None  # file or folder, for source=textfile
    val_docs: list[str] = field(default_factory=list)  # whole documents (plays) held out for validation
    val_fraction: float = field(default=0.1, metadata={"range": "(0, 1)"})  # used when val_docs is empty
    cache_dir: str = ".cache/kvlab"  # tokenized corpora, memory-mapped
    mix: dict[str, float] = field(default_factory=dict)  # data=mix: weight per source (corpus/mix.py); {}: plain text
    key_digits: int = field(default=5, metadata={"range": "[1, 9]"})  # data=mix: digits of its keys and numbers


def load_splits(data: DataConfig, enc: tiktoken.Encoding) -> tuple[np.ndarray, np.ndarray]:
    """Find the documents, hold whole ones out, tokenize both splits (cached on disk). Returns (train, val)."""
    if data.source == "shakespeare":
        docs = shakespeare_plays()
    elif data.source == "textfile":
        if not data.path:
            raise ValueError("data=textfile needs a path: add data.path=<file or folder>")
        docs = text_documents(data.path)
    else:
        raise ValueError(f"unknown data.source {data.source!r}; choose one of {SOURCES}")
    train_docs, val_docs = split_documents(docs, list(data.val_docs), data.val_fraction)
    cache_dir = Path(data.cache_dir)
    return tokenize_cached(train_docs, enc, cache_dir, "train"), tokenize_cached(val_docs, enc, cache_dir, "val")


def validation_tokens(data: dict | None) -> np.ndarray:
    """The validation split of a run's data config, tokenized with our tokenizer.

    `data` is the `data` dict a checkpoint records (config.json: run.data, the fields of DataConfig); None, for a
    checkpoint that records none, means the default held-out plays (HELD_OUT_PLAYS).
    """
    config = DataConfig(**data) if data is not None else DataConfig(val_docs=list(HELD_OUT_PLAYS))
    return load_splits(config, get_tokenizer())[1]
