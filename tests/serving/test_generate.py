"""Sampling and generation: each sampling filter against its definition, seeded reproducibility, and cached
generation / perplexity against the model run uncached on the growing sequence."""

import dataclasses
import math
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from cache.model_cache import ModelCache
from cache.presets import PRESETS, build_cache
from toymodel.config import ModelConfig
from serving.generate import (Sampling, generate, greedy, make_sampler, perplexity_through_cache, top_k_filter,
                               top_p_filter)
from toymodel.decode_layout import pack_for_decode
from toymodel.model import Transformer

TINY = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, block_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def full_cache(model: Transformer, batch_size: int) -> ModelCache:
    return build_cache(PRESETS["full"], model.config, batch_size, torch.device("cpu"), torch.float32)


def make_model(n_kv_head: int = 4) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**TINY, n_kv_head=n_kv_head)).eval()


def random_logits(B: int = 3, V: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
    logits = random_logits()
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert make_sampler(Sampling(temperature=0.0), torch.device("cpu")) is greedy


def test_greedy_picks_the_first_of_ties_on_any_layout():
    """The numpy path answers as torch.argmax: the first of equal maxima, NaN as the largest, strided rows, and a
    float64 row (torch's path)."""
    logits = torch.randn(6, 3, 200, generator=torch.Generator().manual_seed(1))
    logits[0, -1, [17, 5, 120]] = 50.0  # a tie: the first, 5
    logits[1, -1, [40, 9]] = float("nan")
    logits[2, -1] = 1.0  # all tied: 0
    for rows in (logits[:, -1], logits[:, -1].contiguous(), logits[:, -1].double()):
        assert torch.equal(greedy(rows), rows.argmax(-1))
    assert greedy(logits[:, -1])[:3].tolist() == [5, 9, 0]


@pytest.mark.parametrize("k", [1, 5, 50, 80])
def test_top_k_keeps_the_k_largest(k):
    logits = random_logits()
    kept = top_k_filter(logits, k).isfinite()
    assert (kept.sum(-1) == min(k, 50)).all()
    expected = torch.zeros_like(kept).scatter(-1, logits.topk(min(k, 50), dim=-1).indices, True)
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_smallest_nucleus(p):
    logits = random_logits()
    kept = top_p_filter(logits, p).isfinite()
    for row, mask in zip(logits, kept):
        probs, order = row.softmax(-1).sort(descending=True)
        n = int((probs.cumsum(-1) < p).sum()) + 1  # fewest top tokens whose mass reaches p
        n = min(n, len(row))
        assert set(order[:n].tolist()) == set(mask.nonzero().squeeze(-1).tolist())


def test_same_seed_same_samples_other_seed_other_samples():
    logits = random_logits(B=4, V=200).expand(64, 4, 200).reshape(256, 200)  # many draws, flat distribution-ish

    def draws(seed):
        return make_sampler(Sampling(temperature=1.5, top_k=100, top_p=0.95, seed=seed), torch.device("cpu"))(logits)

    assert torch.equal(draws(7), draws(7))
    assert not torch.equal(draws(7), draws(8))


@pytest.mark.parametrize("bad,message", [
    (dict(temperature=-1.0), "sampling.temperature=-1.0"),
    (dict(top_k=-2), "sampling.top_k=-2"),
    (dict(top_p=0.0), "sampling.top_p=0.0"),
    (dict(top_p=1.5), "sampling.top_p=1.5"),
])
def test_bad_sampling_is_named(bad, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        Sampling(**bad)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_greedy_generation_equals_uncached_rerun(n_kv_head):
    model = make_model(n_kv_head)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    new = 24  # past block_size=16: positions keep counting, RoPE extrapolates
    gen = generate(model, prompt, full_cache(model, 2), new, Sampling(temperature=0.0))
    seq = prompt
    with torch.no_grad():
        for _ in range(new):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)  # (B, T+1)
    assert torch.equal(gen.tokens, seq[:, 7:])


def test_generation_reports_timing_and_streams_every_token():
    model = make_model()
    prompt = torch.randint(0, 97, (3, 5))
    streamed = []
    gen = generate(model, prompt, full_cache(model, 3), 6, Sampling(seed=3),
                   on_token=lambda ids: streamed.append(ids.clone()))
    assert gen.tokens.shape == (3, 6) and gen.prompt_tokens == 3 * 5 and gen.decode_steps == 5
    assert torch.equal(torch.stack(streamed, dim=1), gen.tokens)
    assert gen.prefill_seconds > 0 and gen.decode_seconds > 0
    assert gen.prefill_tokens_per_s == pytest.approx(3 * 5 / gen.prefill_seconds)
    assert gen.decode_tokens_per_s == pytest.approx(3 * 5 / gen.decode_seconds)
    assert generate(model, prompt, full_cache(model, 3), 1, Sampling()).decode_tokens_per_s is None


def test_recorded_steps_change_no_token_and_count_the_cache_after_each_step():
    model = make_model()
    prompt = torch.randint(0, 97, (2, 5))
    plain = generate(model, prompt, full_cache(model, 2), 7, Sampling(seed=4))
    cache = full_cache(model, 2)
    gen = generate(model, prompt, cache, 7, Sampling(seed=4), record_steps=True)
    assert torch.equal(gen.tokens, plain.tokens) and plain.step_seconds is None
    assert len(gen.step_seconds) == 6 and gen.decode_seconds == sum(gen.step_seconds) > 0
    assert len(gen.kv_bytes) == 7 and gen.kv_bytes[-1] == cache.total_bytes()  # after prefill, then each step


@pytest.mark.parametrize("bad_prompt,new,message", [
    (torch.zeros(1, 0, dtype=torch.long), 4, "non-empty"),
    (torch.zeros(3, dtype=torch.long), 4, "non-empty"),
    (torch.zeros(1, 3, dtype=torch.long), 0, "max_new_tokens=0"),
])
def test_bad_generate_arguments_are_named(bad_prompt, new, message):
    with pytest.raises(ValueError, match=message):
        generate(make_model(), bad_prompt, full_cache(make_model(), 1), new, Sampling())


def test_perplexity_through_a_full_cache_equals_uncached_loss():
    model = make_model(2)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    ppl = perplexity_through_cache(model, ids, full_cache(model, 2), progress=False)
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)


class AlternatingThreads:
    """A stand-in for toymodel.threads.ThreadGovernor that runs every other step on two threads."""

    def __init__(self) -> None:
        self.steps = 0

    @contextmanager
    def step(self) -> Iterator[None]:
        self.steps += 1
        torch.set_num_threads(1 + self.steps % 2)
        yield


@pytest.mark.parametrize("preset", ["full", "quant4", "window"])
def test_switching_threads_between_steps_changes_no_bit(preset):
    """Every kernel of a decode step splits its work over outputs, never over a sum, so a governor may change the
    thread count between steps: perplexity (the sum of every step's log-loss) and greedy tokens stay exact."""
    torch.manual_seed(0)
    model = pack_for_decode(Transformer(ModelConfig(**{**TINY, "d_model": 128}, n_kv_head=2)).eval())  # D = 32
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    spec = dataclasses.replace(PRESETS[preset], budget=12, window=4) if preset == "window" else PRESETS[preset]
    runs = []
    for threads in (None, AlternatingThreads()):
        cache = build_cache(spec, model.config, 3, torch.device("cpu"), torch.float32)
        ppl = perplexity_through_cache(model, ids, cache, progress=False, threads=threads)
        cache = build_cache(spec, model.config, 3, torch.device("cpu"), torch.float32)
        runs.append((ppl, generate(model, ids[:, :8], cache, 12, Sampling(temperature=0.0), threads=threads).tokens))
    torch.set_num_threads(1)
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
