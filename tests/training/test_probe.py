"""The training-time passkey probe (training/probe.py): an oracle that writes each key scores 1, one that writes a
wrong number scores 0, and a random model trains with data=mix and reports the probe next to the loss."""

import numpy as np
import pytest
import torch

from corpus.splits import validation_tokens
from corpus.tasks import make_samples
from corpus.tokenizer import get_tokenizer
from training.probe import PROBE_SEED, passkey_accuracy

ENC = get_tokenizer()


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return validation_tokens(None)


class Oracle(torch.nn.Module):
    """Logits that put all weight on the next token of each row's answer (or of `wrong` instead)."""

    def __init__(self, held_out: np.ndarray, length: int, samples: int, wrong: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, for the probe's device lookup
        depths = [i / max(1, samples - 1) for i in range(samples)]
        tasks = make_samples(ENC, held_out, ["passkey"], [length], depths, 1, PROBE_SEED, length)
        stop = ENC.encode_ordinary(".")
        self.answers = [(ENC.encode_ordinary(" 11111") if wrong else s.answer) + stop * 8 for s in tasks]
        self.length = length

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1] - self.length  # answer tokens written so far
        logits = torch.zeros(ids.shape[0], ids.shape[1], ENC.n_vocab)
        for row, answer in enumerate(self.answers):
            logits[row, -1, answer[k]] = 1.0
        return logits


@pytest.mark.parametrize("wrong, expected", [(False, 1.0), (True, 0.0)])
def test_the_probe_scores_what_the_model_writes(held_out, wrong, expected):
    oracle = Oracle(held_out, 256, 4, wrong)
    assert passkey_accuracy(oracle, ENC, held_out, 200, samples=4) == expected  # 200: raised to the 256 minimum
