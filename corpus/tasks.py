"""Synthetic long-context tasks with per-sample scores: what a compressed cache can break that perplexity hides.

Each sample hides what it asks for (a needle) at a chosen depth inside a haystack of real Shakespeare, so the
model's language ability still matters, and ends with a question whose answer only the needle holds:

    [ haystack ... needle ... haystack ] question        -> the model generates; a scorer compares with `answer`
      |<-- depth * haystack -->|

    task      needle (RULER / passkey retrieval are the references)            score                 type
    passkey   "The pass key is 48213. Remember it. 48213 is the pass key."     exact digits          retrieval
    multikey  several "One of the special magic numbers for {word} is: {n}."   exact digits          retrieval
              with distinct words, one of them asked for
    vartrack  a chain "VAR A = 12345." "VAR B = A." ... spread through the    exact set of names    tracking
              text, and a second chain as a distractor
    recall    a line of the haystack itself, asked back from its first words  fraction of its       copy
                                                                               tokens reproduced
    continue  none: the true continuation of held-out text                    mean log-likelihood   language
                                                                               per token

Every prompt has exactly `context_length` tokens (the haystack is cut to fit), so samples of one length batch
together without padding. Generation is seeded: the same (seed, task, length, depth) always gives the same sample;
a sample's seed folds all four in, so adding lengths or depths never changes the others. Evaluate on held-out text
(corpus.splits.validation_tokens) with evaluation seeds; train (data=mix) on the training split with others.
"""

import random
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import tiktoken

TASK_TYPES = {"passkey": "retrieval", "multikey": "retrieval", "vartrack": "tracking", "recall": "copy",
              "continue": "language"}
WORDS = ("apple", "river", "candle", "falcon", "meadow", "lantern", "harbor", "violet", "thunder", "marble",
         "willow", "ember", "saddle", "copper", "orchard", "raven", "tulip", "anchor", "velvet", "glacier")
CONTINUE_TOKENS = 32  # the true continuation a `continue` sample scores


@dataclass(frozen=True)
class Sample:
    """One prompt and what it asks for. `answer` is the text a perfect model generates next (for `continue`: the
    true continuation, scored by its likelihood); `depth` is where the needle starts, as a fraction of the
    haystack (1.0 for `continue`, which has none)."""

    prompt: list[int]
    answer: list[int]
    answer_text: str
    task: str
    task_type: str
    context_length: int
    depth: float


def check_request(tasks: list[str], lengths: list[int], depths: list[float], samples: int, max_length: int) -> None:
    """Raise a ValueError naming the bad value: an unknown task, a length above `max_length` (the model's context,
    unless the caller allows more) or too short for the task, a depth outside [0, 1], fewer than one sample."""
    for task in tasks:
        if task not in TASK_TYPES:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_TYPES)}")
    for n in lengths:
        if not 256 <= n <= max_length:
            raise ValueError(f"context length {n} must be in [256, {max_length}] (the model's block_size, unless "
                             f"max_context allows more; 256 leaves room for every task's needles and question)")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depth {d} must be in [0, 1] (0: the start of the haystack, 1: its end)")
    if samples < 1:
        raise ValueError(f"samples={samples} must be at least 1 per (task, length, depth)")


def make_samples(enc: tiktoken.Encoding, haystack: np.ndarray, tasks: list[str], lengths: list[int],
                 depths: list[float], samples: int, seed: int, max_length: int, key_digits: int = 5) -> list[Sample]:
    """`samples` samples for every (task, length, depth), haystacks cut from the token array `haystack`; pass keys
    and magic numbers of `key_digits` digits."""
    check_request(tasks, lengths, depths, samples, max_length)
    out = []
    for task in tasks:
        for n in lengths:
            for d in ([1.0] if task == "continue" else depths):
                for i in range(samples):
                    rng = random.Random(f"{seed}/{task}/{n}/{d}/{i}")  # one stream per sample
                    out.append(maker(task, key_digits)(enc, haystack, n, d, rng))
    return out


def _text(enc: tiktoken.Encoding, s: str) -> list[int]:
    return enc.encode_ordinary(s)


def _haystack(haystack: np.ndarray, n: int, rng: random.Random) -> list[int]:
    """n consecutive tokens from a random place of the haystack array."""
    if n > len(haystack):
        raise ValueError(f"the haystack holds {len(haystack)} tokens, fewer than the {n} a sample needs")
    start = rng.randrange(len(haystack) - n + 1)
    return haystack[start : start + n].astype(np.int64).tolist()


def _assemble(enc: tiktoken.Encoding, haystack: np.ndarray, n: int, needles: list[tuple[float, list[int]]],
              question: list[int], rng: random.Random) -> tuple[list[int], float]:
    """A prompt of exactly n tokens: a haystack with each (depth, needle ids) inserted at that fraction of it, then
    the question. Returns the prompt and where the first needle landed (its depth rounded to a token boundary)."""
    room = n - len(question) - sum(len(ids) + 2 for _, ids in needles)  # + 2: a line break around each needle
    if room < 16:
        raise ValueError(f"context length {n} leaves no haystack around this task's needles; use a longer one")
    hay = _haystack(haystack, room, rng)
    newline = _text(enc, "\n")
    cuts = [round(d * room) for d, _ in needles]  # haystack tokens before each needle
    prompt, at = [], 0
    for cut, (_, ids) in sorted(zip(cuts, needles), key=lambda c: c[0]):  # stable: equal cuts keep their order
        prompt += hay[at:cut] + newline + ids + newline
        at = cut
    return prompt + hay[at:] + question, cuts[0] / room


def _number(rng: random.Random, digits: int) -> str:
    """A random number of exactly `digits` digits (no leading zero): a pass key or a magic number."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _passkey(enc, haystack, n, depth, rng, key_digits: int = 5) -> Sample:
    key = _number(rng, key_digits)
    needle = _text(enc, f"The pass key is {key}. Remember it. {key} is the pass key.")
    question = _text(enc, "\nWhat is the pass key? The pass key is")
    prompt, at = _assemble(enc, haystack, n, [(depth, needle)], question, rng)
    return Sample(prompt, _text(enc, f" {key}"), f" {key}", "passkey", "retrieval", n, at)


def _multikey(enc, haystack, n, depth, rng, key_digits: int = 5, n_keys: int = 4) -> Sample:
    words = rng.sample(WORDS, n_keys)
    numbers = [_number(rng, key_digits) for _ in words]
    needles = [(depth if i == 0 else rng.random(), _text(enc, f"One of the special magic numbers for {w} is: {x}."))
               for i, (w, x) in enumerate(zip(words, numbers))]  # the first one is asked for, at `depth`
    question = _text(enc, f"\nWhat is the special magic number for {words[0]}? The special magic number for "
                          f"{words[0]} is:")
    prompt, at = _assemble(enc, haystack, n, needles, question, rng)
    return Sample(prompt, _text(enc, f" {numbers[0]}"), f" {numbers[0]}", "multikey", "retrieval", n, at)


def _names(rng: random.Random, k: int) -> list[str]:
    names: set[str] = set()
    while len(names) < k:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    return sorted(names, key=lambda _: rng.random())


def _vartrack(enc, haystack, n, depth, rng, hops: int = 3) -> Sample:
    names = _names(rng, 2 * (hops + 1))
    chain, decoy = names[: hops + 1], names[hops + 1 :]
    value, other = rng.sample(range(10_000, 100_000), 2)
    needles = []
    for chain_names, v, start in ((chain, value, depth), (decoy, other, rng.random())):
        lines = [f"VAR {chain_names[0]} = {v}."] + [f"VAR {b} = {a}." for a, b in zip(chain_names, chain_names[1:])]
        steps = [start + (1.0 - start) * i / (len(lines) + 1) for i in range(len(lines))]  # in order, after start
        needles += [(s, _text(enc, line)) for s, line in zip(steps, lines)]
    question = _text(enc, f"\nWhich variables hold the value {value}? They are:")
    prompt, at = _assemble(enc, haystack, n, needles, question, rng)  # needles[0]: the chain's first assignment
    answer = " " + " ".join(chain)
    return Sample(prompt, _text(enc, answer), answer, "vartrack", "tracking", n, at)


def _recall(enc, haystack, n, depth, rng, lead_words: int = 4) -> Sample:
    for _ in range(100):  # a whole line of Shakespeare with enough words to ask back
        lines = enc.decode(_haystack(haystack, 48, rng)).split("\n")[1:-1]  # the ends may be cut mid-line
        candidates = [line.strip() for line in lines if len(line.split()) >= lead_words + 4]
        if candidates:
            break
    else:
        raise ValueError("the haystack has no line long enough for a recall sample")
    words = rng.choice(candidates).split()
    lead, rest = " ".join(words[:lead_words]), " " + " ".join(words[lead_words:])
    needle = _text(enc, lead + rest)
    question = _text(enc, f"\nRepeat the line that begins \"{lead}\":\n{lead}")
    prompt, at = _assemble(enc, haystack, n, [(depth, needle)], question, rng)
    return Sample(prompt, _text(enc, rest), rest, "recall", "copy", n, at)


def _continue(enc, haystack, n, depth, rng) -> Sample:
    window = _haystack(haystack, n + CONTINUE_TOKENS, rng)
    answer = window[n:]
    return Sample(window[:n], answer, enc.decode(answer), "continue", "language", n, 1.0)


MAKERS = {"passkey": _passkey, "multikey": _multikey, "vartrack": _vartrack, "recall": _recall,
          "continue": _continue}
NUMBER_TASKS = ("passkey", "multikey")  # their answer is a number of key_digits digits (one token per digit)


def maker(task: str, key_digits: int = 5) -> Callable[..., Sample]:
    """The sample maker of `task`, (enc, haystack, n, depth, rng) -> Sample, its numbers `key_digits` long."""
    if not 1 <= key_digits <= 9:
        raise ValueError(f"key_digits={key_digits} must be in [1, 9]")
    return partial(MAKERS[task], key_digits=key_digits) if task in NUMBER_TASKS else MAKERS[task]


# ---------------------------------------------------------------------------------------------------- scoring


def exact_digits(generated: str, answer: str) -> float:
    """1.0 when the first number in the generated text is the answer's number, else 0.0."""
    found = re.search(r"\d+", generated)
    return float(found is not None and found.group() == answer.strip())


def exact_set(generated: str, answer: str) -> float:
    """1.0 when the variable names (5 capitals) in the generation's first line are exactly the answer's set."""
    first = generated.strip().split("\n")[0]
    return float(set(re.findall(r"\b[A-Z]{5}\b", first)) == set(answer.split()))


def reproduced_fraction(generated: list[int], answer: list[int]) -> float:
    """The fraction of the answer's tokens the generation reproduces in order: LCS(generated, answer) / len."""
    prev = [0] * (len(generated) + 1)
    for a in answer:
        row = [0]
        for j, g in enumerate(generated):
            row.append(prev[j] + 1 if a == g else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1] / len(answer)


def score(sample: Sample, generated: list[int], enc: tiktoken.Encoding) -> float:
    """The score of a generated continuation (token ids) for a sample of a generating task (not `continue`)."""
    text = enc.decode(generated)
    if sample.task in ("passkey", "multikey"):
        return exact_digits(text, sample.answer_text)
    if sample.task == "vartrack":
        return exact_set(text, sample.answer_text)
    if sample.task == "recall":
        return reproduced_fraction(generated, sample.answer)
    raise ValueError(f"task {sample.task!r} is scored by likelihood, not by a generation")
