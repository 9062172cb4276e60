"""The toy model's tokenizer: a 4096-token byte-level BPE trained on Shakespeare, run by tiktoken.

`corpus/bpe.py` learns the merges (pure Python, for reading); this module ships the result as a ranks
file in tiktoken's text format (`corpus/assets/shakespeare-4k.tiktoken`, one `base64(token) rank` per
line) and loads it into a `tiktoken.Encoding`, whose Rust encoder is fast enough for the whole corpus.

Vocabulary: ids 0..4094 are BPE tokens (0..255 the single bytes), id 4095 is `<|endoftext|>`, which
separates documents in the token stream. Because every byte is a token, `decode(encode(s)) == s` for any
string.

Retrain (a few seconds on 2 CPU cores) and rewrite the ranks file with:  python -m corpus.tokenizer --train
"""
from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import os
import pathlib
import tempfile
import time

import tiktoken

from corpus.bpe import GPT2_SPLIT_PATTERN, train_bpe

NAME = "shakespeare-4k"
VOCAB_SIZE = 4096  # BPE ranks + special tokens
EOT = "<|endoftext|>"
EOT_ID = VOCAB_SIZE - 1
RANKS_PATH = pathlib.Path(__file__).parent / "assets" / f"{NAME}.tiktoken"
HELD_OUT_PLAYS = ("hamlet", "the-tempest", "twelfth-night")  # the default validation plays
_REGENERATE = "regenerate it with `python -m corpus.tokenizer --train`"


def read_ranks(path: pathlib.Path = RANKS_PATH) -> dict[bytes, int]:
    """Parse a tiktoken ranks file and check it holds exactly ranks 0..VOCAB_SIZE-2.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if a line does not parse or the ranks are not the expected 0..4094.
    """
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer ranks file {path} is missing; {_REGENERATE}.")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # also catches binascii.Error from bad base64
            raise ValueError(f"tokenizer ranks file {path} is corrupt at line {lineno}: {line[:60]!r}; "
                             f"{_REGENERATE}.") from e
    n_ranks = VOCAB_SIZE - 1
    if sorted(ranks.values()) != list(range(n_ranks)) or any(ranks.get(bytes([b])) != b for b in range(256)):
        raise ValueError(f"tokenizer ranks file {path} must hold ranks 0..{n_ranks - 1} once each, with the "
                         f"256 single bytes at 0..255 (found {len(ranks)} tokens); {_REGENERATE}.")
    return ranks


def write_ranks(ranks: dict[bytes, int], path: pathlib.Path = RANKS_PATH) -> None:
    """Write `ranks` in tiktoken's text format, atomically (temp file, then rename)."""
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
             sorted(ranks.items(), key=lambda item: item[1])]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(b"\n".join(lines) + b"\n")
    os.chmod(tmp.name, 0o644)  # temp files are private (0600); package data must be readable by all
    os.replace(tmp.name, path)


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The shared tokenizer (loaded once): 4095 BPE ranks plus `<|endoftext|>` = 4095."""
    return tiktoken.Encoding(
        NAME,
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=read_ranks(),
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def tokenizer_id(enc: tiktoken.Encoding) -> str:
    """A short stable identity of `enc`, e.g. 'shakespeare-4k-3f2a9c1d0b7e6a54', for cache invalidation.

    It hashes the name (which stands for the split pattern) and the bytes of every token id, special
    tokens included, so token caches built with another tokenizer or an older ranks file are not reused
    (see `corpus.documents.tokenize_cached`).
    """
    digest = hashlib.sha256(enc.name.encode())
    for token_id in range(enc.n_vocab):
        token = enc.decode_single_token_bytes(token_id)
        digest.update(len(token).to_bytes(4, "little") + token)
    return f"{enc.name}-{digest.hexdigest()[:16]}"


def train(path: pathlib.Path = RANKS_PATH) -> float:
    """Retrain the BPE on the training plays and write the ranks file. Returns the training time in seconds.

    The plays held out for validation by default (conf/data/shakespeare.yaml) are left out here too, so the
    tokenizer has never seen the text the model is validated on.
    """
    from corpus.documents import shakespeare_plays  # local import: data.py imports this module

    plays = sorted((name, p) for name, p in shakespeare_plays().items() if name not in HELD_OUT_PLAYS)
    texts = [p.read_text(encoding="utf-8") for _, p in plays]
    start = time.perf_counter()
    ranks = train_bpe(texts, vocab_size=VOCAB_SIZE - 1, pat_str=GPT2_SPLIT_PATTERN, progress=True)
    seconds = time.perf_counter() - start
    write_ranks(ranks, path)
    get_tokenizer.cache_clear()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help=f"retrain and rewrite {RANKS_PATH}")
    args = parser.parse_args()
    if not args.train:
        parser.error("nothing to do: pass --train to retrain the tokenizer")
    seconds = train()
    enc = get_tokenizer()
    print(f"trained {enc.name} in {seconds:.1f} s -> {RANKS_PATH} ({tokenizer_id(enc)})")


if __name__ == "__main__":
    main()
