"""Evenly spaced held-out windows (corpus/windows.py) and the validation split a checkpoint's data config names
(corpus/splits.py): what infer.py's mode=ppl and the benchmarks score perplexity on."""

import numpy as np
import pytest
import torch

from corpus.splits import DataConfig, load_splits, validation_tokens
from corpus.tokenizer import get_tokenizer
from corpus.windows import evenly_spaced_windows


def _tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)  # token i is i: a window's first token is its start


def test_windows_have_the_asked_shape_and_hold_consecutive_tokens():
    w = evenly_spaced_windows(_tokens(1000), 5, 63)
    assert w.shape == (5, 64) and w.dtype == torch.int64
    assert torch.equal(w - w[:, :1], torch.arange(64).expand(5, 64))  # each row a contiguous run of the split


def test_windows_are_evenly_spaced_from_the_start_to_the_end_of_the_split():
    n, T, B = 1001, 100, 6
    starts = evenly_spaced_windows(_tokens(n), B, T)[:, 0]
    expected = torch.from_numpy(np.linspace(0, n - T - 1, B).round().astype(np.int64))  # reference spacing
    assert torch.equal(starts, expected)
    assert starts[0] == 0 and starts[-1] + T + 1 == n  # first window at the start, last one ends the split
    gaps = starts.diff()
    assert int(gaps.max() - gaps.min()) <= 1  # even, up to rounding


def test_windows_may_overlap_and_are_the_same_every_call():
    tokens = _tokens(50)
    w = evenly_spaced_windows(tokens, 8, 20)  # 8 x 21 tokens from 50: they overlap
    assert torch.equal(w, evenly_spaced_windows(tokens, 8, 20))
    assert w[0, 0] == 0 and w[-1, -1] == 49


def test_a_split_of_exactly_length_plus_one_tokens_is_enough():
    w = evenly_spaced_windows(_tokens(17), 3, 16)
    assert torch.equal(w, torch.arange(17).expand(3, 17))


def test_a_too_short_split_names_the_knob_and_the_fix():
    with pytest.raises(ValueError, match=r"the split has 16 tokens, too few for ppl.length=16 .* ppl.length<=15"):
        evenly_spaced_windows(_tokens(16), 2, 16, "ppl.length")


@pytest.mark.parametrize("n_windows,length,message", [(0, 8, "n_windows=0"), (2, 0, "length=0")])
def test_no_windows_or_empty_windows_are_refused(n_windows, length, message):
    with pytest.raises(ValueError, match=f"{message} must be at least 1"):
        evenly_spaced_windows(_tokens(100), n_windows, length)


def test_validation_tokens_follow_the_recorded_data_config(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Line {i} of a small corpus.\n" for i in range(200)))
    data = {"source": "textfile", "path": str(text), "val_docs": [], "val_fraction": 0.2,
            "cache_dir": str(tmp_path / "tokens")}
    _, expected = load_splits(DataConfig(**data), get_tokenizer())
    assert np.array_equal(validation_tokens(data), expected)
