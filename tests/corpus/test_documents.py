"""Tests for the corpus, splits, token cache and batches (corpus/documents.py, corpus/windows.py)."""
import math
import pathlib

import numpy as np
import pytest
import torch

from corpus.documents import shakespeare_plays, split_documents, text_documents, tokenize_cached
from corpus.windows import eval_batches, sample_batch
from corpus.tokenizer import get_tokenizer

VAL_PLAYS = ["hamlet", "the-tempest", "twelfth-night"]


def test_all_38_plays_are_found_as_markdown():
    plays = shakespeare_plays()
    assert len(plays) == 38
    assert {"hamlet", "the-tempest", "twelfth-night", "macbeth"} <= plays.keys()
    assert all(path.suffix == ".md" and path.stem == slug for slug, path in plays.items())


def test_split_by_play_holds_out_exactly_the_named_plays():
    plays = shakespeare_plays()
    train, val = split_documents(plays, VAL_PLAYS, val_fraction=0.1)
    assert sorted(val) == VAL_PLAYS
    assert train.keys() == plays.keys() - set(VAL_PLAYS)
    assert all(val[name] == plays[name] for name in VAL_PLAYS)


def test_unknown_play_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"hamlett.*valid names are.*'hamlet'"):
        split_documents(shakespeare_plays(), ["hamlett"], val_fraction=0.1)


def test_fraction_split_holds_out_the_last_documents_in_sorted_order():
    docs = {f"doc{i}": f"text {i}" for i in range(10)}
    train, val = split_documents(docs, [], val_fraction=0.25)
    n_val = math.ceil(0.25 * 10)
    assert sorted(val) == sorted(docs)[-n_val:]
    assert sorted(train) == sorted(docs)[:-n_val]


def test_single_document_splits_its_tail_on_a_line_boundary(tmp_path: pathlib.Path):
    lines = [f"line {i}\n" for i in range(100)]
    (tmp_path / "one.txt").write_text("".join(lines))
    train, val = split_documents(text_documents(str(tmp_path / "one.txt")), [], val_fraction=0.1)
    assert train["one.txt"] + val["one.txt"] == "".join(lines)
    assert val["one.txt"].startswith("line ") and train["one.txt"].endswith("\n")
    assert 0.05 < len(val["one.txt"]) / len("".join(lines)) <= 0.15


def test_splits_that_would_be_empty_are_refused():
    with pytest.raises(ValueError, match="empty train or validation"):
        split_documents({"a": "x", "b": "y"}, ["a", "b"], val_fraction=0.1)
    with pytest.raises(ValueError, match="empty train or validation"):
        split_documents({"a": "x", "b": "y"}, [], val_fraction=0.9)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        split_documents({"a": "x", "b": "y"}, [], val_fraction=1.5)


def test_text_documents_reads_a_folder_recursively(tmp_path: pathlib.Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.py").write_text("not text")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("hidden")
    assert text_documents(str(tmp_path)) == {"a.txt": tmp_path / "a.txt", "sub/b.md": tmp_path / "sub" / "b.md"}


def test_missing_path_and_empty_corpus_errors(tmp_path: pathlib.Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        text_documents(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no non-empty"):
        text_documents(str(tmp_path))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty"):
        text_documents(str(tmp_path))


def test_tokenize_cached_joins_documents_with_eot(tmp_path: pathlib.Path):
    enc = get_tokenizer()
    docs = {"b": "second doc", "a": "First doc, with <|endoftext|> in it."}
    tokens = tokenize_cached(docs, enc, tmp_path, "train")
    expected = enc.encode_ordinary(docs["a"]) + [enc.eot_token] + enc.encode_ordinary(docs["b"])
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert enc.decode(tokens.tolist()) == docs["a"] + "<|endoftext|>" + docs["b"]


def test_cache_is_reused_and_invalidated_when_a_document_changes(tmp_path: pathlib.Path):
    enc = get_tokenizer()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("To be, or not to be.")
    (corpus / "b.txt").write_text("All the world's a stage.")
    cache_dir = tmp_path / "cache"

    first = tokenize_cached(text_documents(str(corpus)), enc, cache_dir, "train")
    [cache_file] = cache_dir.glob("train-*.bin")
    cache_file.write_bytes(np.array([7, 7, 7], dtype=np.uint16).tobytes())  # poison: proves reuse
    assert tokenize_cached(text_documents(str(corpus)), enc, cache_dir, "train").tolist() == [7, 7, 7]

    (corpus / "b.txt").write_text("All the world's a stage, and all the men and women merely players.")
    changed = tokenize_cached(text_documents(str(corpus)), enc, cache_dir, "train")
    assert len(list(cache_dir.glob("train-*.bin"))) == 2
    assert changed.tolist() != first.tolist() and enc.decode(changed.tolist()).endswith("merely players.")
    assert not list(cache_dir.glob("*.tmp"))  # atomic write leaves no temp file


def _tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)  # each token equals its position: windows are easy to check


def test_sample_batch_shapes_and_shift_by_one():
    x, y = sample_batch(_tokens(1000), batch_size=4, block_size=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted one token ahead
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous windows
    assert int(y.max()) < 1000


def test_sample_batch_is_deterministic_given_the_generator_state():
    tokens = _tokens(5000)
    gen = torch.Generator().manual_seed(123)
    state = gen.get_state()
    first = sample_batch(tokens, 8, 32, gen)
    second = sample_batch(tokens, 8, 32, gen)
    gen.set_state(state)
    replay = sample_batch(tokens, 8, 32, gen)
    assert torch.equal(first[0], replay[0]) and torch.equal(first[1], replay[1])
    assert not torch.equal(first[0], second[0])


def test_sample_batch_on_a_too_short_split_says_so():
    with pytest.raises(ValueError, match="16 tokens, too few for block_size=16"):
        sample_batch(_tokens(16), 2, 16, torch.Generator())
    x, _ = sample_batch(_tokens(17), 2, 16, torch.Generator())  # exactly block_size + 1 is enough
    assert torch.equal(x[0], torch.arange(16))


def test_eval_batches_are_deterministic_and_span_the_split():
    tokens = _tokens(10_001)
    batches = list(eval_batches(tokens, batch_size=4, block_size=100, max_batches=3))
    again = list(eval_batches(tokens, batch_size=4, block_size=100, max_batches=3))
    assert len(batches) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and starts[-1] == 10_001 - 101  # first and last window of the split
    assert all(torch.equal(y, x + 1) for x, y in batches)


def test_eval_batches_use_every_non_overlapping_window_when_few_fit():
    batches = list(eval_batches(_tokens(1001), batch_size=3, block_size=100, max_batches=100))
    x = torch.cat([x for x, _ in batches])
    assert x.shape == (10, 100) and [len(b[0]) for b in batches] == [3, 3, 3, 1]
    assert torch.equal(x[:, 0], torch.arange(0, 1000, 100))  # ten windows tile the split exactly
