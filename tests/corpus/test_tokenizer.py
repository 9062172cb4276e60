"""Tests for the BPE trainer (corpus/bpe.py) and the shipped tokenizer (corpus/tokenizer.py)."""
import base64
import pathlib
from collections import Counter

import pytest
import regex
import tiktoken

from corpus.bpe import GPT2_SPLIT_PATTERN, encode_ordinary, train_bpe
from corpus.documents import shakespeare_plays
from corpus.tokenizer import (EOT, EOT_ID, VOCAB_SIZE, get_tokenizer, read_ranks, tokenizer_id,
                                write_ranks)

ODD_STRINGS = [
    "",
    " ",
    "\n\n\n",
    "  \t trailing spaces   ",
    "\r\nwindows\r\nlines\r\n",
    "naïve café, Straße, Ångström",
    "日本語のテキスト",
    "emoji 🤖🧠 and flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "combining e\u0301 and zero\u200bwidth",
    "\x00control\x07chars\x7f",
    "lone surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|endoftext|> as ordinary text",
]


def _merge_order(ranks: dict[bytes, int]) -> list[bytes]:
    return [token for token, _ in sorted(ranks.items(), key=lambda item: item[1])][256:]


def test_trainer_reproduces_the_textbook_merge_order():
    # Wikipedia's BPE example: 'aa' (4 pairs) first, then 'ab' (tie with 'aa'+'a', broken by bytes),
    # then 'aa'+'ab' = 'aaab' (2 occurrences), then the all-ones tie goes to the smallest bytes: 'a'+'c'.
    ranks = train_bpe(["aaabdaaabac"], vocab_size=260)
    assert _merge_order(ranks) == [b"aa", b"ab", b"aaab", b"ac"]


def test_trainer_counts_pieces_not_characters_across_splits():
    # Pieces: 'the', ' the', ',', ' the', '.'. 'th' and 'he' tie at 3 and 'h'+'e' sorts first; then
    # 't'+'he' (3), then ' '+'the' (2). 'e'+',' would also be frequent without the regex split.
    ranks = train_bpe(["the the, the."], vocab_size=256 + 3)
    assert _merge_order(ranks) == [b"he", b"the", b" the"]


def test_trainer_agrees_with_a_brute_force_recount():
    # Reference: recount every pair from scratch after each merge (no incremental updates).
    text = "she sells sea shells by the sea shore; the shells she sells are sea shells, sure."
    ranks = train_bpe([text], vocab_size=256 + 20)
    words = [[bytes([b]) for b in p.encode()] for p in regex.findall(GPT2_SPLIT_PATTERN, text)]
    expected = []
    for _ in range(20):
        counts = Counter(pair for w in words for pair in zip(w, w[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        expected.append(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [best[0] + best[1]]
                i += 1
    assert _merge_order(ranks) == expected


def test_tiktoken_with_trained_ranks_encodes_like_the_reference_greedy_merge():
    corpus = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    ranks = train_bpe([corpus], vocab_size=300)
    enc = tiktoken.Encoding("tiny", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in [corpus, "to be nobler, or not? 'Tis the mind.", *ODD_STRINGS]:
        assert enc.encode_ordinary(text) == encode_ordinary(ranks, text)
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_shipped_tokenizer_has_4096_tokens_and_eot_last():
    enc = get_tokenizer()
    assert VOCAB_SIZE == 4096 and enc.n_vocab == VOCAB_SIZE
    assert enc.eot_token == EOT_ID == 4095
    assert enc.encode(EOT, allowed_special={EOT}) == [4095]
    assert enc.max_token_value == 4095


def test_shipped_tokenizer_encodes_like_the_reference_on_corpus_text():
    enc = get_tokenizer()
    sample = shakespeare_plays()["macbeth"].read_text(encoding="utf-8")[:20_000]
    assert enc.encode_ordinary(sample) == encode_ordinary(read_ranks(), sample)


@pytest.mark.parametrize("slug", ["hamlet", "the-tempest", "a-winter-s-tale"])
def test_round_trip_on_whole_plays(slug):
    enc = get_tokenizer()
    text = shakespeare_plays()[slug].read_text(encoding="utf-8")
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # a trained BPE compresses its own corpus


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_round_trip_on_odd_unicode(text):
    enc = get_tokenizer()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_round_trip_on_random_bytes_as_text():
    enc = get_tokenizer()
    text = bytes(range(256)).decode("latin-1") + "".join(chr(c) for c in range(0x2000, 0x2400))
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_ranks_file_round_trips_and_identity_tracks_content(tmp_path: pathlib.Path):
    ranks = read_ranks()
    copy = tmp_path / "copy.tiktoken"
    write_ranks(ranks, copy)
    assert read_ranks(copy) == ranks
    enc = get_tokenizer()
    assert tokenizer_id(enc) == tokenizer_id(enc)
    swapped = dict(ranks)
    a, b = (token for token, rank in ranks.items() if rank in (300, 301))
    swapped[a], swapped[b] = ranks[b], ranks[a]
    other = tiktoken.Encoding(enc.name, pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=swapped,
                              special_tokens={EOT: EOT_ID})
    assert tokenizer_id(other) != tokenizer_id(enc)


def test_missing_or_corrupt_ranks_file_says_how_to_regenerate(tmp_path: pathlib.Path):
    with pytest.raises(FileNotFoundError, match="--train"):
        read_ranks(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(base64.b64encode(b"a") + b" zero\n")
    with pytest.raises(ValueError, match="line 1.*--train"):
        read_ranks(bad)
    short = tmp_path / "short.tiktoken"
    write_ranks({bytes([i]): i for i in range(256)}, short)
    with pytest.raises(ValueError, match="0..4094.*--train"):
        read_ranks(short)
