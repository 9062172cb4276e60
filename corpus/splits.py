"""From a DataConfig to the two token arrays a run trains and validates on."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken

from corpus.documents import shakespeare_plays, split_documents, text_documents, tokenize_cached

SOURCES = ("shakespeare", "textfile")


@dataclass
class DataConfig:
    """Where the text comes from (conf/data/*.yaml)."""

    source: str = "shakespeare"  # shakespeare | textfile
    path: str | None = None  # file or folder, for source=textfile
    val_docs: list[str] = field(default_factory=list)  # whole documents (plays) held out for validation
    val_fraction: float = 0.1  # used when val_docs is empty
    cache_dir: str = ".cache/kvlab"  # tokenized corpora, memory-mapped


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
