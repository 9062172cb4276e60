"""data=mix: training windows drawn from a weighted mixture of plain plays and the task families of corpus/tasks.py.

A model trained on plays alone never needs anything far back (a line's meaning rarely depends on a token 800
positions earlier), so it never learns to; compressing its cache then costs nothing, which proves nothing. Mixing
in task samples (a pass key to repeat, magic numbers, variable chains, a line to recall) gives it a reason to
look back across its whole context. Each training row is one source, drawn with probability proportional to its
weight:

    plays                   a random window of T + 1 tokens of the training split
    repeat                  [ a window of the training split, a span of it repeated at the end ]
                              targets IGNORE ...........................   scored
    passkey, multikey, ...  [ text | a task prompt of random length and depth | answer . | text ]
                              targets IGNORE ..................................  scored   IGNORE

A task row scores only its answer and the stop after it: its text and prompt are plain text the play rows already
teach, and the few answer tokens are the whole lesson of the row. The stop (the "." the needles themselves put
after a key) teaches the model to end the answer: a row that ended with its answer never showed what comes after
one, and a model trained on such rows wrote "358728378" for the key 35872. The training loss averages each row's
scored tokens first (training/loop.py: lm_loss), so a six-token answer weighs as much as a row of 1,024 play tokens.

Task samples are made on the fly from the training split, never the held-out plays, with seeds drawn from the
batch's torch.Generator: the same generator state gives the same batch (exact resume), and no evaluation sample
(held-out text, evaluation seeds) is ever trained on.
"""

import random

import numpy as np
import tiktoken
import torch

from corpus.tasks import TASK_TYPES, maker

SOURCES = ("plays", "repeat") + tuple(t for t in TASK_TYPES if t != "continue")  # continue *is* plays
MIN_TASK_TOKENS = 192  # the shortest task prompt drawn (vartrack's eight lines and question take ~120)
ANSWER_ROOM = 32  # tokens kept free for the answer after the prompt
REPEAT_SPAN = (8, 64)  # tokens a `repeat` row copies
IGNORE = -100  # a target no loss is taken on (F.cross_entropy's ignore_index)


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
    """Training batches (x, y), int64 (B, T), from the mixture `weights` over the token array `tokens`; y is
    IGNORE where a task row's target is not its answer."""

    def __init__(self, tokens: np.ndarray, weights: dict[str, float], min_seq_len: int, enc: tiktoken.Encoding,
                 key_digits: int = 5):
        """`min_seq_len`: the shortest rows a batch will be asked for (the block_size, or train.seq_len_start
        under a sequence length warmup), checked here to fit a task sample. `key_digits`: the length of the pass
        keys and magic numbers (data.key_digits)."""
        check_weights(weights)
        if min_seq_len + 1 < MIN_TASK_TOKENS + ANSWER_ROOM:
            raise ValueError(f"data=mix needs rows of at least {MIN_TASK_TOKENS + ANSWER_ROOM - 1} tokens to fit a "
                             f"task sample, got {min_seq_len}; use a longer model (e.g. model=ctx1k) or a larger "
                             f"train.seq_len_start")
        self.tokens, self.enc = tokens, enc
        self.makers = {name: maker(name, key_digits) for name in weights if name in TASK_TYPES}
        self.names = [name for name, w in weights.items() if w > 0]
        self.probs = torch.tensor([weights[name] for name in self.names], dtype=torch.float64)

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator).tolist()  # (B,)
        seqs, scored = zip(*(self.row(self.names[r], seq_len, generator) for r in rows))
        seqs = torch.from_numpy(np.stack(seqs).astype(np.int64))  # (B, T + 1)
        y = torch.full_like(seqs[:, 1:], IGNORE)  # (B, T)
        for b, (start, end) in enumerate(scored):
            y[b, start:end] = seqs[b, start + 1 : end + 1]
        return seqs[:, :-1], y  # (B, T), (B, T)

    def row(self, source: str, seq_len: int, generator: torch.Generator) -> tuple[np.ndarray, tuple[int, int]]:
        """One sequence of seq_len + 1 tokens from `source`, and the targets it scores: [start, end) of the
        seq_len targets, target t being token t + 1."""
        n = seq_len + 1
        if source == "plays":
            return self._window(n, generator), (0, n - 1)
        if source == "repeat":
            return self._repeat(n, generator)
        length = int(torch.randint(MIN_TASK_TOKENS, n - ANSWER_ROOM + 1, (1,), generator=generator))
        depth = float(torch.rand((), generator=generator))
        seed = int(torch.randint(2**62, (1,), generator=generator))  # one seeded stream per row
        sample = self.makers[source](self.enc, self.tokens, length, depth, random.Random(seed))
        answer = sample.answer + self.enc.encode_ordinary(".")  # the answer, then its stop
        body = np.asarray(sample.prompt + answer, dtype=np.int64)
        if len(body) > n:
            raise ValueError(f"a {source} sample of {len(body)} tokens does not fit a row of {n}; raise ANSWER_ROOM")
        before = int(torch.randint(n - len(body) + 1, (1,), generator=generator))  # text around the sample
        row = np.concatenate([self._window(before, generator), body, self._window(n - before - len(body), generator)])
        end = before + len(body)  # the token after the stop
        return row, (end - 1 - len(answer), end - 1)  # the targets that predict the answer and the stop

    def _repeat(self, n: int, generator: torch.Generator) -> tuple[np.ndarray, tuple[int, int]]:
        """[ text ... span ... text | span again ], the second copy scored: the whole job of an induction head
        (find where this context occurred before, copy what followed), which every retrieval task needs. The span
        is tokens of the training split drawn one by one at random, so nothing but the copy predicts it: a span of
        real text could be guessed from its start, and a model learns to guess long before it learns to copy."""
        longest = min(REPEAT_SPAN[1], n // 4)  # short rows (a sequence length warmup's first) copy short spans
        span = int(torch.randint(REPEAT_SPAN[0], longest + 1, (1,), generator=generator))
        picks = torch.randint(len(self.tokens), (span,), generator=generator).numpy()  # (span,)
        drill = np.asarray(self.tokens[picks], dtype=np.int64)
        text = self._window(n - 2 * span, generator)
        cut = int(torch.randint(len(text) + 1, (1,), generator=generator))  # text before the first copy
        return np.concatenate([text[:cut], drill, text[cut:], drill]), (n - 1 - span, n - 1)

    def _window(self, n: int, generator: torch.Generator) -> np.ndarray:
        start = int(torch.randint(len(self.tokens) - n + 1, (1,), generator=generator))
        return np.asarray(self.tokens[start : start + n], dtype=np.int64)
