"""Byte-level BPE, trained from scratch: how a tokenizer's vocabulary is learned.

The model never sees text, only integer ids. This module learns those ids from a corpus with byte pair
encoding (BPE), the algorithm behind GPT-2's tokenizer, and writes them in tiktoken's format so the fast
Rust encoder in `tiktoken` can apply them (`corpus/tokenizer.py` does that).

The algorithm, in four steps:

1. **Pre-tokenize.** A regex (GPT-2's, `GPT2_SPLIT_PATTERN`) cuts text into pieces: a word with its leading
   space (" thee"), a run of digits, a run of punctuation, or whitespace. Merges never cross a piece
   boundary, so " thee" and "thee," share the token " thee" instead of learning "thee," separately.
2. **Start from bytes.** Every piece is its UTF-8 bytes; token ids 0..255 are the 256 single bytes. Any
   string can therefore be encoded (no unknown token), and decoding is the exact inverse: concatenate bytes.
3. **Merge the most frequent adjacent pair**, over and over. The merged bytes become the next token id, so
   a token's id is also its *rank*: the order in which it was learned. Ties go to the pair whose
   (left bytes, right bytes) sorts first, so training is deterministic.
4. **Stop** when the vocabulary has `vocab_size` tokens.

Two tricks keep this fast on a few MB (minutes, not hours):

- Count each distinct piece once: " the" occurs ~25k times in Shakespeare, but we keep one copy and its
  count. Pair counts are weighted by piece frequency.
- Update pair counts incrementally. A merge only changes the pieces that contain the merged pair, so we
  keep an index pair -> pieces containing it, subtract those pieces' old pairs, merge, and add their new
  pairs. A heap (with stale entries skipped when popped) finds the most frequent pair.

Encoding (`encode_ordinary`) applies the learned ranks greedily, as tiktoken does: inside each piece,
repeatedly merge the adjacent pair whose concatenation has the lowest rank, until no pair is a token.
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Iterable

import regex
from tqdm import tqdm

# GPT-2's split pattern, as tiktoken writes it ("r50k_base"): contractions, letters, digits, other
# symbols, each optionally with one leading space, then runs of whitespace.
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def count_pieces(texts: Iterable[str], pat_str: str = GPT2_SPLIT_PATTERN) -> Counter[bytes]:
    """Step 1: split every text with the regex and count each distinct piece (as UTF-8 bytes)."""
    pattern = regex.compile(pat_str)
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(piece.encode("utf-8") for piece in pattern.findall(text))
    return counts


def _pairs(word: list[int]) -> Counter[tuple[int, int]]:
    """Adjacent (left, right) token pairs of one piece, with multiplicity."""
    return Counter(zip(word, word[1:]))


def _merge(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `word`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pat_str: str = GPT2_SPLIT_PATTERN,
    progress: bool = False,
) -> dict[bytes, int]:
    """Learn a byte-level BPE vocabulary of `vocab_size` tokens from `texts`.

    Args:
        texts: the training corpus, one string per document (pieces never span two documents).
        vocab_size: number of mergeable tokens to learn, including the 256 single bytes.
        pat_str: the pre-tokenization regex; encode with the same one.
        progress: show a tqdm bar over the merges.

    Returns:
        `mergeable_ranks` in tiktoken's format: token bytes -> rank, with the 256 single bytes at ranks
        0..255 and each merged token at the next rank, in merge order.

    Raises:
        ValueError: if `vocab_size < 256`, or the corpus runs out of pairs before reaching `vocab_size`.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: it must be at least 256 (one per byte).")
    vocab: list[bytes] = [bytes([b]) for b in range(256)]  # id -> token bytes
    ranks: dict[bytes, int] = {token: i for i, token in enumerate(vocab)}

    # Distinct pieces as lists of token ids, and how often each piece occurs.
    piece_counts = count_pieces(texts, pat_str)
    words: list[list[int]] = [list(piece) for piece in piece_counts]
    freqs: list[int] = list(piece_counts.values())

    # Pair statistics over the whole corpus, and where each pair occurs (may hold stale entries).
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair, n in _pairs(word).items():
            pair_counts[pair] += n * freq
            where[pair].add(w)

    # Max-heap on count via negation; ties broken by the pair's bytes. Entries go stale when a count
    # changes; a fresh entry is pushed then, and stale ones are skipped when popped.
    def entry(pair: tuple[int, int]) -> tuple[int, bytes, bytes, tuple[int, int]]:
        return (-pair_counts[pair], vocab[pair[0]], vocab[pair[1]], pair)

    heap = [entry(pair) for pair in pair_counts]
    heapq.heapify(heap)

    bar = tqdm(total=vocab_size - len(ranks), desc="BPE merges", disable=not progress)
    while len(ranks) < vocab_size:
        if not heap:
            raise ValueError(
                f"the corpus ran out of pairs to merge at {len(ranks)} tokens, short of "
                f"vocab_size={vocab_size}; train on more text or ask for a smaller vocabulary."
            )
        neg_count, left, right, pair = heapq.heappop(heap)
        if -neg_count != pair_counts.get(pair, 0):
            continue  # stale entry: this pair's count changed after the entry was pushed
        token = left + right
        # A merge can rebuild bytes we already have (ab+c after a+bc): reuse that id, add no new rank.
        if token not in ranks:
            ranks[token] = len(vocab)
            vocab.append(token)
            bar.update(1)
        new_id = ranks[token]

        changed: set[tuple[int, int]] = set()
        for w in where.pop(pair):
            word, freq = words[w], freqs[w]
            old_pairs = _pairs(word)
            if pair not in old_pairs:
                continue  # stale index entry: an earlier merge already consumed this pair here
            new_word = _merge(word, pair, new_id)
            new_pairs = _pairs(new_word)
            for p in old_pairs.keys() | new_pairs.keys():
                delta = (new_pairs[p] - old_pairs[p]) * freq
                if delta:
                    pair_counts[p] += delta
                    changed.add(p)
            for p in new_pairs.keys() - old_pairs.keys():
                where[p].add(w)
            words[w] = new_word
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, entry(p))
            else:
                del pair_counts[p]
    bar.close()
    return ranks


def encode_piece(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """Encode one pre-tokenized piece: merge the lowest-ranked adjacent pair until none is a token.

    This is the reference for what tiktoken's Rust encoder computes; it is quadratic and only for tests
    and teaching.
    """
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        candidates = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min((c for c in candidates if c[0] is not None), default=(None, -1))
        if rank is None:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[part] for part in parts]


def encode_ordinary(ranks: dict[bytes, int], text: str, pat_str: str = GPT2_SPLIT_PATTERN) -> list[int]:
    """Encode `text` (no special tokens) with `ranks`: pre-tokenize, then `encode_piece` on each piece."""
    return [
        token
        for piece in regex.findall(pat_str, text)
        for token in encode_piece(ranks, piece.encode("utf-8"))
    ]
