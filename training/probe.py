"""A training-time probe of long-range retrieval: passkey accuracy on a few held-out samples, so that a data=mix
recipe that is not learning to look back shows it within minutes, next to the loss, instead of after a run.

Each sample is a held-out haystack with a key of data.key_digits digits hidden at a depth spread over [0, 1] and the
question at the end (corpus/tasks.py); the model answers greedily, a few tokens, without a KV cache (every forward
re-reads the whole prompt: slower than the cache's decoding but independent of it, and a handful of forwards every
eval interval); corpus.tasks.score marks it right only when the first number it writes is the key.
"""

import numpy as np
import tiktoken
import torch

from corpus.tasks import make_samples, score

PROBE_SEED = 777  # evaluation seeds of the probe's own; the haystacks are held-out text, never trained on
MIN_LENGTH = 256  # the shortest prompt a task sample fits (corpus.tasks.check_request)


@torch.no_grad()
def passkey_accuracy(model: torch.nn.Module, enc: tiktoken.Encoding, held_out: np.ndarray, length: int,
                     key_digits: int = 5, samples: int = 8) -> float:
    """The share of `samples` passkey prompts of `length` tokens (at least 256), keys of `key_digits` digits, that
    `model` answers right, greedily. The caller sets eval mode and autocast. Returns a number in [0, 1]."""
    length = max(length, MIN_LENGTH)
    depths = [i / max(1, samples - 1) for i in range(samples)]
    tasks = make_samples(enc, held_out, ["passkey"], [length], depths, 1, PROBE_SEED, length, key_digits)
    device = next(model.parameters()).device
    ids = torch.tensor([s.prompt for s in tasks], device=device)  # (N, length)
    for _ in range(max(len(s.answer) for s in tasks) + 1):  # the key (a token per digit), then one more
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(dim=-1)], dim=1)  # (N, one more token): greedy
    answers = ids[:, length:].tolist()  # (N, answer tokens + 1)
    return sum(score(s, a, enc) for s, a in zip(tasks, answers)) / len(tasks)
