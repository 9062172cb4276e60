"""data=mix (corpus/mix.py): rows follow the weights, a batch is a function of its generator, task rows end with
their answer and score only it, and bad weights are named."""

import pytest
import torch

from corpus.mix import IGNORE, SOURCES, MixSampler
from corpus.splits import validation_tokens
from corpus.tokenizer import get_tokenizer

ENC = get_tokenizer()


@pytest.fixture(scope="module")
def tokens():
    return validation_tokens(None)  # any split will do; training uses the training split


def test_rows_follow_the_weights(tokens):
    """Counted from the rows batch() returns: a play row scores every target, a passkey row a few."""
    sampler = MixSampler(tokens, {"plays": 3.0, "passkey": 1.0, "recall": 0.0}, 256, ENC)
    _, y = sampler.batch(800, 256, torch.Generator().manual_seed(0))
    plays = int((y != IGNORE).all(dim=1).sum())
    passkeys = int(((y != IGNORE).sum(dim=1) <= 8).sum())
    assert abs(plays / 800 - 0.75) < 0.05 and plays + passkeys == 800  # nothing else: recall weighs 0


def test_a_batch_is_a_function_of_its_generator_and_task_rows_hold_their_answer_and_a_stop(tokens):
    sampler = MixSampler(tokens, {s: 1.0 for s in SOURCES}, 256, ENC)
    x1, y1 = sampler.batch(6, 256, torch.Generator().manual_seed(5))
    x2, y2 = sampler.batch(6, 256, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (6, 256)
    shifted = y1[:, :-1] != IGNORE  # (B, T - 1): scored targets are the next inputs
    assert torch.equal(x1[:, 1:][shifted], y1[:, :-1][shifted])
    row, (start, end) = sampler.row("passkey", 256, torch.Generator().manual_seed(1))
    text = ENC.decode(row.tolist())
    key = text.split("The pass key is ")[1][:5]
    assert len(row) == 257 and f"What is the pass key? The pass key is {key}." in text
    assert ENC.decode(row[start + 1 : end + 1].tolist()) == f" {key}."  # the targets: the answer and its stop


def test_task_rows_score_only_their_answer_and_stop_and_play_rows_everything(tokens):
    sampler = MixSampler(tokens, {"plays": 1.0, "multikey": 1.0}, 256, ENC)
    x, y = sampler.batch(16, 256, torch.Generator().manual_seed(3))
    stop = ENC.encode_ordinary(".")
    for xr, yr in zip(x, y):
        scored = yr != IGNORE
        if scored.all():  # a play row
            continue
        where = scored.nonzero().squeeze(1)  # (n,): one contiguous run
        n, first = len(where), int(where[0])
        assert torch.equal(where, torch.arange(first, first + n))
        assert n == len(ENC.encode_ordinary(" 12345")) + len(stop)  # the answer, then its stop
        assert ENC.decode(xr[: first + 1].tolist()).endswith("is:")  # the question comes just before
        assert yr[where[-1]].item() == stop[0] and ENC.decode(yr[where[:-1]].tolist()).strip().isdigit()
    assert 0 < (y == IGNORE).any(dim=1).sum() < 16  # both kinds of row were drawn
    tails = [int((yr != IGNORE).nonzero()[-1]) for yr in y if (yr == IGNORE).any()]
    assert any(t < 255 for t in tails)  # samples sit mid-row, text follows them


def test_a_repeat_row_scores_the_second_copy_of_a_span_it_holds_earlier(tokens):
    sampler = MixSampler(tokens, {"repeat": 1.0}, 256, ENC)
    for seed in range(5):
        row, (start, end) = sampler.row("repeat", 256, torch.Generator().manual_seed(seed))
        scored = end - start
        assert end == 256  # the second copy ends the row
        span = row[-scored:]
        earlier = row[:-scored]
        starts = [i for i in range(len(earlier) - scored + 1) if (earlier[i : i + scored] == span).all()]
        assert len(row) == 257 and 8 <= scored <= 64 and starts  # the span occurred before


@pytest.mark.parametrize("weights,message", [
    ({"plays": -1.0}, "data.mix.plays=-1.0 must be >= 0"),
    ({"plays": 0.0, "passkey": 0.0}, "all zero"),
    ({"needles": 1.0}, "unknown source 'needles'"),
])
def test_bad_weights_are_named(tokens, weights, message):
    with pytest.raises(ValueError, match=message):
        MixSampler(tokens, weights, 256, ENC)


def test_key_digits_sets_the_length_of_the_keys_a_task_row_scores(tokens):
    sampler = MixSampler(tokens, {"passkey": 1.0}, 256, ENC, key_digits=2)
    row, (start, end) = sampler.row("passkey", 256, torch.Generator().manual_seed(4))
    answer = ENC.decode(row[start + 1 : end + 1].tolist())
    assert len(answer) == 4 and answer[0] == " " and answer[1:3].isdigit() and answer[3] == "."
