"""Text generation and perplexity through a KV cache: the two ways inference exercises the cache seam.

    prompt (B, T) ──prefill: one forward over all T tokens──▶ cache holds T tokens, logits of the last one
                  ──decode: one forward per new token──────▶ every layer cache attends and evicts each step

Sampling is a few pure functions on a (B, vocab) logits tensor: greedy (argmax) when temperature == 0, otherwise
temperature, then top-k, then top-p (nucleus), then one draw from a seeded `torch.Generator`. `make_sampler`
picks the composition once, so the decode loop does no per-step Python beyond calling it.

Timing follows DESIGN.md. Prefill = the forward over the prompt plus sampling the first new token (time to first
token). Decode = the remaining `max_new_tokens - 1` steps, each one forward of one token per sequence; decode
throughput counts the tokens those steps produce, so it never includes prefill. On CUDA the clock is read after
a synchronize, at the two phase boundaries only. With `record_steps`, the same loop also notes each decode step's
time (a synchronize after every step on CUDA) and the cache's bytes after it, read outside the timed steps; decode
time is then the sum of the steps' times. The comparison runner plots both (bench/compare.py).

`perplexity_through_cache` feeds held-out text one token at a time, so every token passes through `update`
and the cache's policy and codec shape every prediction, at any length (RoPE positions are not capped at the
training context; the model simply extrapolates).
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from toymodel.ranges import NON_NEGATIVE, SEED, check_ranges
from toymodel.threads import ThreadGovernor, governed_step

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits (B, vocab) -> token ids (B,)


@dataclass
class Sampling:
    """How the next token is picked. temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off.
    Each number declares its valid range (toymodel/ranges.py), checked when a Sampling is made."""

    temperature: float = field(default=0.8, metadata=NON_NEGATIVE)
    top_k: int = field(default=0, metadata=NON_NEGATIVE)
    top_p: float = field(default=1.0, metadata={"range": "(0, 1]"})
    seed: int = field(default=1337, metadata=SEED)

    def __post_init__(self) -> None:
        check_ranges(self, "sampling")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: logits (B, V) -> ids (B,), the first of ties (torch.argmax's answer).

    Float32 CPU logits go through numpy's argmax, which is vectorized where torch's is not: (48, 4096) logits took
    19 us against torch's 457 us (one thread, 2-core Xeon), 2% of a serving engine's decode step at that batch."""
    if logits.is_cpu and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept). (B, V) -> (B, V)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p; -inf elsewhere.

    A token survives when the tokens strictly more likely than it hold less than p of the mass, so the most
    likely token always survives. (B, V) -> (B, V).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V): mass of the tokens ranked above each one
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= p)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def draw(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sample per row from softmax(logits): (B, V) -> ids (B,)."""
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_sampler(sampling: Sampling, device: torch.device) -> Sampler:
    """Compose the sampling functions once; the returned sampler maps logits (B, V) to ids (B,)."""
    if sampling.temperature == 0:
        return greedy
    generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / sampling.temperature
        if sampling.top_k > 0:
            logits = top_k_filter(logits, sampling.top_k)
        if sampling.top_p < 1.0:
            logits = top_p_filter(logits, sampling.top_p)
        return draw(logits, generator)

    return sample


@dataclass
class Generation:
    """What `generate` returns: the new tokens and the time each phase took."""

    tokens: torch.Tensor  # (B, max_new_tokens) ids, prompt excluded
    prompt_tokens: int  # real prompt tokens over the batch (a ragged batch: the sum of its rows' lengths)
    prefill_seconds: float
    decode_seconds: float
    step_seconds: list[float] | None = None  # record_steps: each decode step's seconds, in order
    kv_bytes: list[int] | None = None  # record_steps: the cache's bytes after prefill, then after each decode step

    @property
    def decode_steps(self) -> int:
        return self.tokens.shape[1] - 1  # the first new token comes out of prefill

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_s(self) -> float | None:
        """B * tokens produced by decode steps / decode seconds; None when there was no decode step."""
        if self.decode_steps == 0:
            return None
        return self.tokens.shape[0] * self.decode_steps / self.decode_seconds


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    cache,
    max_new_tokens: int,
    sampling: Sampling,
    on_token: Callable[[torch.Tensor], None] | None = None,
    prefill: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    record_steps: bool = False,
    threads: ThreadGovernor | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> Generation:
    """Prefill `prompt_ids` (B, T) through `cache` in one forward, then decode `max_new_tokens` tokens.

    `cache` must be empty (a fresh ModelCache for batch size B). `prompt_lengths` (B,): the real tokens of each
    row of a right-padded batch of prompts of different lengths (a cache on the block pool takes them in one
    forward; None: all T). `on_token(ids)` is called with each new (B,) tensor as soon as it is sampled, e.g. to
    stream text; reading it on the host costs a GPU sync per step. `prefill(model, prompt_ids) -> logits`
    replaces the prefill forward (memhier's `cache.prefill` loads a stored prefix and computes only the rest);
    the last row of its logits picks the first new token. `record_steps` notes every decode step's seconds and
    the cache's bytes (cache.total_bytes()) after prefill and after each step, read outside the timed steps.
    `threads`, if given, times every decode step and sets the thread count of the next (toymodel/threads.py).

    Raises:
        ValueError: if prompt_ids is not a non-empty (B, T) tensor or max_new_tokens < 1.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty (B, T) tensor, got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if prompt_lengths is not None and prefill is not None:
        raise ValueError("prompt_lengths (a ragged batch) cannot go with a prefill function: memhier's prefill "
                         "takes prompts of one length")
    device = prompt_ids.device
    sample = make_sampler(sampling, device)
    out = torch.empty(prompt_ids.shape[0], max_new_tokens, dtype=torch.long, device=device)  # (B, N)

    sync(device)
    start = time.perf_counter()
    if prefill is None:
        logits = model(prompt_ids, cache, last_only=True, lengths=prompt_lengths)  # (B, 1, V)
    else:
        logits = prefill(model, prompt_ids)  # (B, *, V)
    out[:, 0] = sample(logits[:, -1])  # logits of the last prompt token (B, V) -> (B,)
    sync(device)
    prefill_seconds = time.perf_counter() - start
    if on_token is not None:
        on_token(out[:, 0])

    steps, kv_bytes = ([], [cache.total_bytes()]) if record_steps else (None, None)
    start = step_start = time.perf_counter()
    for i in range(1, max_new_tokens):
        with governed_step(threads):
            out[:, i] = sample(model(out[:, i - 1 : i], cache)[:, -1])  # feed (B, 1), read logits (B, V)
        if on_token is not None:
            on_token(out[:, i])
        if record_steps:  # each step timed alone, the cache's bytes read between steps, untimed
            sync(device)
            steps.append(time.perf_counter() - step_start)
            kv_bytes.append(cache.total_bytes())
            step_start = time.perf_counter()
    sync(device)
    decode_seconds = sum(steps) if record_steps else time.perf_counter() - start
    prompt_tokens = prompt_ids.numel() if prompt_lengths is None else int(prompt_lengths.sum())
    return Generation(out, prompt_tokens, prefill_seconds, decode_seconds, steps, kv_bytes)


@torch.inference_mode()
def perplexity_through_cache(model: torch.nn.Module, ids: torch.Tensor, cache, progress: bool = True,
                             threads: ThreadGovernor | None = None) -> float:
    """exp(mean next-token loss) of ids (B, T), fed one token per forward through the empty `cache`.

    Scores the T - 1 predictions ids[:, 1:] from their prefixes; each prefix is whatever the cache kept of it.

    Raises:
        ValueError: if ids is not a (B, T) tensor with T >= 2.
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be a (B, T) tensor with T >= 2 to score a prediction, got {tuple(ids.shape)}")
    B, T = ids.shape
    nll = torch.zeros((), dtype=torch.float64, device=ids.device)  # summed on the device: no sync per step
    for t in tqdm(range(T - 1), desc="perplexity", unit="tok", disable=not progress):
        with governed_step(threads):  # the thread policy times each step, as in generate
            logits = model(ids[:, t : t + 1], cache)[:, -1]  # (B, V): the prediction for token t + 1
            nll += F.cross_entropy(logits.float(), ids[:, t + 1], reduction="sum")
    return math.exp(nll.item() / (B * (T - 1)))
