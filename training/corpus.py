"""From a DataConfig to the two token arrays a run trains and validates on."""

from pathlib import Path

import numpy as np
import tiktoken

from toymodel.data import shakespeare_plays, split_documents, text_documents, tokenize_cached
from training.config import DataConfig

SOURCES = ("shakespeare", "textfile")


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
