"""A request, and the sequence the engine makes of it: its tokens, its sampler, where it is in its life, its clock.

    add ──▶ WAITING ──admitted: prefill──▶ RUNNING ──a stop condition──▶ FINISHED
               ▲                              │
               └──── preempted: blocks freed ─┘   (re-queued at the front; its prefill recomputes what it had)

A sequence holds no cache of its own: its keys and values live in the engine's block pool, one row of the running
batch's cache (serving/engine.py). Preemption by recompute gives its blocks back and keeps its tokens, so when it
is admitted again it prefills prompt + output so far and carries on; its sampler keeps its generator, so a seeded
request draws the same tokens with or without preemption.
"""

import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable

import torch

from cache.presets import CacheSpec
from serving.generate import Sampler, Sampling, make_sampler


PROTECTED_WINDOW = 32  # KV-Compress's protected window when neither the request nor its preset names one


@dataclass
class Request:
    """What a client asks for: continue `prompt` (token ids) by at most `max_tokens` tokens, sampled by
    `sampling` (greedy by default), stopping early at any id of `stop_ids` (e.g. the end-of-text id) or when the
    text ends with one of `stop` (needs the engine's tokenizer). The stop id or string is kept in the output."""

    prompt: list[int]
    max_tokens: int = 64
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0))
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    cache: str | None = None  # a preset for this request (None: the engine's); see Engine.add for what mixes
    max_cache_tokens: int | None = None  # KV-Compress (serving/kvcompress.py): tokens kept per layer and KV head
    protected_window_size: int | None = None  # recent tokens never evicted, the observation window (None: 32, or
    # the window of a kvcompress preset)
    compress_once: bool = True  # compress once, right after prefill (False: also while decoding)

    def check(self) -> None:
        """Raise ValueError naming the field of a request the engine cannot serve."""
        if len(self.prompt) == 0:
            raise ValueError("prompt: a request needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: a request must ask for at least one token")
        if self.max_cache_tokens is not None and self.max_cache_tokens < 1:
            raise ValueError(f"max_cache_tokens={self.max_cache_tokens}: a budget must keep at least one token "
                             f"(None: no budget)")
        if self.protected_window_size is not None and self.protected_window_size < 0:
            raise ValueError(f"protected_window_size={self.protected_window_size} must be at least 0")


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request in the engine: its output so far and its timings (time.perf_counter seconds)."""

    id: int
    request: Request
    sampler: Sampler
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "length" (max_tokens), "stop" (a stop id or string)
    preemptions: int = 0
    held_blocks: int = 0  # blocks its row of the running cache holds, and those its next decode step takes: set by
    next_blocks: int = 0  # the engine from the cache after every step (a compressed row's heads differ in length)
    held_back: list[int] = field(default_factory=list)  # blocks held unused: its residual's charge (KIVI), or those
    # KV-Compress freed but it keeps (free_evicted=False)
    compressed_blocks: int = 0  # blocks it held right after its last compression (its window may keep it above
    # the budget: it compresses again only once it has grown a block per head past the larger of the two)
    evicting: CacheSpec | None = None  # the evicting preset its cohort runs (None: the cohort keeping every token)
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None

    @classmethod
    def of(cls, id: int, request: Request, device: torch.device) -> "Sequence":
        request.check()
        if request.protected_window_size is None:
            request = replace(request, protected_window_size=PROTECTED_WINDOW)
        return cls(id, request, make_sampler(request.sampling, device))

    @property
    def rescores(self) -> bool:
        """Whether its keys keep scoring while it decodes, for KV-Compress to compress it again."""
        return self.request.max_cache_tokens is not None and not self.request.compress_once

    @property
    def cohort(self) -> str | None:
        """Which running batch its row lies in: its evicting preset's (knobs and all, so two presets of one name
        never share a batch), or None (every token kept)."""
        return None if self.evicting is None else repr(self.evicting)

    @property
    def tokens(self) -> list[int]:
        """What a prefill feeds: the prompt, and after a preemption the output so far too."""
        return self.request.prompt + self.output

    @property
    def n_tokens(self) -> int:
        return len(self.request.prompt) + len(self.output)

    def append(self, token: int, decode: Callable[[list[int]], str] | None) -> None:
        """Take the next token and finish the sequence if a stop condition holds."""
        now = time.perf_counter()
        self.first_token = now if self.first_token is None else self.first_token
        self.output.append(token)
        if token in self.request.stop_ids or self._ends_with_stop(decode):
            self.finish("stop", now)
        elif len(self.output) >= self.request.max_tokens:
            self.finish("length", now)

    def _ends_with_stop(self, decode: Callable[[list[int]], str] | None) -> bool:
        """Whether the output's text ends with a stop string: only its last tokens are decoded (a string of n
        characters lies within the last 4n tokens: every token is at least one byte of UTF-8)."""
        if not self.request.stop or decode is None:
            return False
        tail = self.output[-4 * max(map(len, self.request.stop)):]
        return decode(tail).endswith(self.request.stop)

    def finish(self, reason: str, now: float) -> None:
        self.status, self.finish_reason, self.finished = Status.FINISHED, reason, now
