"""The long-context task suite (corpus/tasks.py): reproducible samples, answers really in their prompts at the
stated depth, exact prompt lengths, scorers on hand-made cases, and clear errors."""

import numpy as np
import pytest

from corpus.splits import validation_tokens
from corpus.tasks import TASK_TYPES, exact_digits, exact_set, make_samples, reproduced_fraction, score
from corpus.tokenizer import get_tokenizer

ENC = get_tokenizer()
GENERATING = [t for t in TASK_TYPES if t != "continue"]


@pytest.fixture(scope="module")
def haystack() -> np.ndarray:
    return validation_tokens(None)  # the held-out plays


def samples(haystack, seed=0, tasks=tuple(TASK_TYPES), lengths=(256, 384), depths=(0.0, 0.5, 1.0), n=2):
    return make_samples(ENC, haystack, list(tasks), list(lengths), list(depths), n, seed, max_length=1024)


def test_same_seed_same_samples_other_seed_other_needles(haystack):
    a, b, c = samples(haystack, 0), samples(haystack, 0), samples(haystack, 1)
    assert a == b
    assert [s.answer_text for s in a] != [s.answer_text for s in c]
    # a sample depends on its own (seed, task, length, depth, index), not on the rest of the grid
    assert samples(haystack, 0, lengths=(384,)) == [s for s in a if s.context_length == 384]


def test_every_prompt_has_its_length_and_every_answer_is_in_its_prompt_at_its_depth(haystack):
    for s in samples(haystack):
        assert len(s.prompt) == s.context_length and s.task_type == TASK_TYPES[s.task]
        if s.task == "continue":
            continue
        text = ENC.decode(s.prompt)
        wanted = s.answer_text.split() if s.task == "vartrack" else [s.answer_text.strip()]
        assert all(w in text for w in wanted), (s.task, wanted)
        if s.task in ("passkey", "recall"):  # one needle: the haystack tokens before it are depth * the haystack
            needle, question = needle_and_question(s)
            at = next(i for i in range(len(s.prompt)) if s.prompt[i : i + len(needle)] == needle)
            room = len(s.prompt) - len(question) - len(needle) - 2  # - 2: the line breaks around the needle
            assert s.prompt[-len(question):] == question
            assert abs((at - 1) / room - s.depth) <= 1 / room, (s.task, s.depth, at, room)


def needle_and_question(s) -> tuple[list[int], list[int]]:
    """The needle and the question of a passkey or recall sample, as the generator writes them."""
    if s.task == "passkey":
        key = s.answer_text.strip()
        return (ENC.encode_ordinary(f"The pass key is {key}. Remember it. {key} is the pass key."),
                ENC.encode_ordinary("\nWhat is the pass key? The pass key is"))
    lead = ENC.decode(s.prompt).split("\n")[-1]  # the question ends with the line's first words
    question = f"\nRepeat the line that begins \"{lead}\":\n{lead}"
    return ENC.encode_ordinary(lead + s.answer_text), ENC.encode_ordinary(question)


def test_a_perfect_generation_scores_one_and_a_wrong_one_less(haystack):
    for s in samples(haystack, tasks=GENERATING, lengths=(256,), depths=(0.5,), n=1):
        assert score(s, s.answer, ENC) == 1.0
        assert score(s, ENC.encode_ordinary(" 0 nothing here"), ENC) < 1.0


def test_scorers_on_hand_made_cases():
    assert exact_digits(" 48213. And then", " 48213") == 1.0
    assert exact_digits(" 4821", " 48213") == 0.0 and exact_digits(" no digits", " 48213") == 0.0
    assert exact_set(" BBBBB AAAAA\nCCCCC", " AAAAA BBBBB") == 1.0  # order free, first line only
    assert exact_set(" AAAAA", " AAAAA BBBBB") == 0.0 and exact_set(" AAAAA BBBBB CCCCC", " AAAAA BBBBB") == 0.0
    assert reproduced_fraction([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert reproduced_fraction([1, 9, 3], [1, 2, 3, 4]) == 0.5  # 1 and 3, in order
    assert reproduced_fraction([4, 3, 2, 1], [1, 2, 3, 4]) == 0.25
    assert reproduced_fraction([], [1, 2]) == 0.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(tasks=("needle",)), "unknown task 'needle'"),
    (dict(lengths=(2048,)), "context length 2048 must be in \\[256, 1024\\]"),
    (dict(lengths=(128,)), "context length 128 must be in \\[256, 1024\\]"),
    (dict(depths=(1.5,)), "needle depth 1.5 must be in \\[0, 1\\]"),
    (dict(n=0), "samples=0 must be at least 1"),
])
def test_bad_requests_are_named(haystack, kwargs, message):
    with pytest.raises(ValueError, match=message):
        samples(haystack, **kwargs)


@pytest.mark.parametrize("digits", [1, 2, 7])
def test_key_digits_sets_the_length_of_pass_keys_and_magic_numbers(haystack, digits):
    samples = make_samples(ENC, haystack, ["passkey", "multikey"], [256], [0.5], 3, 1, 256, key_digits=digits)
    for s in samples:
        key = s.answer_text.strip()
        assert key.isdigit() and len(key) == digits and key in ENC.decode(s.prompt)
        assert score(s, s.answer + ENC.encode_ordinary("."), ENC) == 1.0  # the scorer follows the key's length


def test_key_digits_outside_one_to_nine_is_named(haystack):
    with pytest.raises(ValueError, match="key_digits=0 must be in"):
        make_samples(ENC, haystack, ["passkey"], [256], [0.5], 1, 1, 256, key_digits=0)
