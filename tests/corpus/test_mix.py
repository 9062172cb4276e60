"""data=mix (corpus/mix.py): rows follow the weights, a batch is a function of its generator, task rows end with
their answer, and bad weights are named."""

import pytest
import torch

from corpus.mix import SOURCES, MixSampler
from corpus.splits import validation_tokens
from corpus.tokenizer import get_tokenizer

ENC = get_tokenizer()


@pytest.fixture(scope="module")
def tokens():
    return validation_tokens(None)  # any split will do; training uses the training split


def test_rows_follow_the_weights(tokens):
    sampler = MixSampler(tokens, {"plays": 3.0, "passkey": 1.0, "recall": 0.0}, 256, ENC)
    g = torch.Generator().manual_seed(0)
    rows = torch.multinomial(sampler.probs, 4000, replacement=True, generator=g)
    share = (rows == sampler.names.index("plays")).float().mean().item()
    assert sampler.names == ["plays", "passkey"] and abs(share - 0.75) < 0.03


def test_a_batch_is_a_function_of_its_generator_and_task_rows_end_with_their_answer(tokens):
    sampler = MixSampler(tokens, {s: 1.0 for s in SOURCES}, 256, ENC)
    x1, y1 = sampler.batch(6, torch.Generator().manual_seed(5))
    x2, y2 = sampler.batch(6, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (6, 256)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    row = sampler.row("passkey", torch.Generator().manual_seed(1))
    text = ENC.decode(row.tolist())
    key = text.split("The pass key is ")[1][:5]
    assert len(row) == 257 and text.endswith(f"The pass key is {key}")


@pytest.mark.parametrize("weights,message", [
    ({"plays": -1.0}, "data.mix.plays=-1.0 must be >= 0"),
    ({"plays": 0.0, "passkey": 0.0}, "all zero"),
    ({"needles": 1.0}, "unknown source 'needles'"),
])
def test_bad_weights_are_named(tokens, weights, message):
    with pytest.raises(ValueError, match=message):
        MixSampler(tokens, weights, 256, ENC)
