"""data=mix: training windows drawn from a weighted mixture of plain plays and the task families of corpus/tasks.py.

A model trained on plays alone never needs anything far back (a line's meaning rarely depends on a token 800
positions earlier), so it never learns to; compressing its cache then costs nothing, which proves nothing. Mixing
in task samples (a pass key to repeat, magic numbers, variable chains, a line to recall) gives it a reason to
look back across its whole context. Each training row is one source, drawn with probability proportional to its
weight:

    plays                   a random window of block_size + 1 tokens of the training split
    passkey, multikey, ...  [ filler from the training split | a task prompt of random length and depth | answer ]

Task samples are made on the fly from the training split, never the held-out plays, with seeds drawn from the
batch's torch.Generator: the same generator state gives the same batch (exact resume), and no evaluation sample
(held-out text, evaluation seeds) is ever trained on.
"""

import random

import numpy as np
import tiktoken
import torch

from corpus.tasks import MAKERS, TASK_TYPES

SOURCES = ("plays",) + tuple(t for t in TASK_TYPES if t != "continue")  # continue *is* plays
MIN_TASK_TOKENS = 192  # the shortest task prompt drawn (vartrack's eight lines and question take ~120)
ANSWER_ROOM = 32  # tokens kept free for the answer after the prompt


def check_weights(weights: dict[str, float]) -> None:
    """Raise a ValueError naming the problem: an unknown source, a negative weight, or no positive weight."""
    for name, w in weights.items():
        if name not in SOURCES:
            raise ValueError(f"data.mix has an unknown source {name!r}; choose from {', '.join(SOURCES)}")
        if w < 0:
            raise ValueError(f"data.mix.{name}={w} must be >= 0 (a weight, relative to the others)")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"data.mix weights {weights} are all zero; give at least one source a positive weight")


class MixSampler:
    """Training batches (x, y), int64 (B, T), from the mixture `weights` over the token array `tokens`."""

    def __init__(self, tokens: np.ndarray, weights: dict[str, float], block_size: int, enc: tiktoken.Encoding):
        check_weights(weights)
        if block_size + 1 < MIN_TASK_TOKENS + ANSWER_ROOM:
            raise ValueError(f"data=mix needs block_size >= {MIN_TASK_TOKENS + ANSWER_ROOM - 1} to fit a task "
                             f"sample, got {block_size}; use a longer model (e.g. model=ctx1k)")
        self.tokens, self.block_size, self.enc = tokens, block_size, enc
        self.names = [name for name, w in weights.items() if w > 0]
        self.probs = torch.tensor([weights[name] for name in self.names], dtype=torch.float64)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator).tolist()  # (B,)
        seqs = np.stack([self.row(self.names[r], generator) for r in rows])  # (B, T + 1)
        seqs = torch.from_numpy(seqs.astype(np.int64))
        return seqs[:, :-1], seqs[:, 1:]  # (B, T), (B, T)

    def row(self, source: str, generator: torch.Generator) -> np.ndarray:
        """One sequence of block_size + 1 tokens from `source`."""
        n = self.block_size + 1
        if source == "plays":
            return self._window(n, generator)
        length = int(torch.randint(MIN_TASK_TOKENS, n - ANSWER_ROOM + 1, (1,), generator=generator))
        depth = float(torch.rand((), generator=generator))
        seed = int(torch.randint(2**62, (1,), generator=generator))  # one seeded stream per row
        sample = MAKERS[source](self.enc, self.tokens, length, depth, random.Random(seed))
        body = np.asarray(sample.prompt + sample.answer, dtype=np.int64)[:n]
        return np.concatenate([self._window(n - len(body), generator), body])  # filler first, answer last

    def _window(self, n: int, generator: torch.Generator) -> np.ndarray:
        start = int(torch.randint(len(self.tokens) - n + 1, (1,), generator=generator))
        return np.asarray(self.tokens[start : start + n], dtype=np.int64)
