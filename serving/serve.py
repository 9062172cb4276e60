"""`python infer.py mode=serve`: a workload of requests through the engine, with arrival times, and what it cost.

    python infer.py mode=serve                                    # 32 prompts from held-out plays, all at once
    python infer.py mode=serve serve.requests=64 serve.rate=4     # Poisson arrivals, 4 requests/s on average
    python infer.py mode=serve serve.workload=requests.jsonl      # your own: one JSON request per line

The default workload: prompts from held-out plays (the checkpoint's validation split), each ending at a speaker's
name, so the answer is one speech, and a speech ends at its blank line (the stop string "\\n\\n"). A workload file
holds one request per line: {"prompt": "...", "max_tokens": 64, "temperature": 0.8, "top_p": 1.0, "top_k": 0,
"seed": 1, "stop": ["\\n\\n"], "max_cache_tokens": 96, "protected_window_size": 32, "compress_once": true}, every
field but the prompt optional (the serve and sampling groups give the defaults; max_cache_tokens and its companions
are KV-Compress's knobs, serving/kvcompress.py). Time runs for real: a request arrives at its time, waits, is
admitted when the scheduler says, and its latency runs from arrival to its last token.

    python infer.py mode=serve serve.max_cache_tokens=64          # every request with a KV-Compress budget
    python infer.py mode=serve cache=h2o                          # every request evicting by H2O (its cohort)
"""

import json
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from serving.engine import HEADROOM, Completion, Engine
from serving.generate import Sampling
from serving.sequence import Request
from toymodel.ranges import NON_NEGATIVE, POSITIVE, SEED, check_ranges

SPEAKER = re.compile(r"\*\*[^*\n]+\*\*  \n")  # a speech's first line in the corpus: **NAME**, two spaces, newline
REQUEST_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "cache",
                  "max_cache_tokens", "protected_window_size", "compress_once"}


@dataclass
class ServeConfig:
    """mode=serve: the workload, how it arrives, and the engine's sizes."""

    workload: str | None = None  # a JSONL file of requests; None: `requests` prompts from held-out plays
    requests: int = field(default=32, metadata=POSITIVE)
    prompt_tokens: int = field(default=256, metadata=POSITIVE)  # about this many tokens per generated prompt
    max_tokens: int = field(default=128, metadata=POSITIVE)  # per request, unless its line says otherwise
    rate: float | None = field(default=None, metadata={"range": "(0, inf)"})  # requests/s, Poisson; None: at once
    seed: int = field(default=0, metadata=SEED)  # which prompts, and the arrival times
    kv_bytes: int = field(default=64 * 2**20, metadata=POSITIVE)  # the block pool's size
    max_batch: int = field(default=64, metadata=POSITIVE)  # running sequences at most
    max_prefill_tokens: int = field(default=4096, metadata=POSITIVE)  # prompt tokens per prefill step
    headroom: int = field(default=HEADROOM, metadata=NON_NEGATIVE)  # decode steps of the running batch's growth
    # that admission keeps free (0: the next step's alone)
    stop: list[str] = field(default_factory=lambda: ["\n\n"])  # default stop strings: the end of a speech
    max_cache_tokens: int | None = field(default=None, metadata=POSITIVE)  # KV-Compress budget; None: none
    protected_window_size: int | None = field(default=None, metadata=NON_NEGATIVE)  # KV-Compress; None: 32 or the
    # kvcompress preset's window
    cache: str | None = None  # each request's preset (None: the engine's, cache=...); e.g. kvcompress
    host: str = "127.0.0.1"  # mode=http: where the server listens (loopback by default)
    port: int = field(default=8000, metadata={"range": "[1, 65535]"})
    max_queue: int = field(default=256, metadata=POSITIVE)  # mode=http: waiting requests before a 429
    prefix_caching: bool = True  # keep full prompt blocks for later prompts that begin alike (serving/prefix.py)

    def __post_init__(self) -> None:
        check_ranges(self, "serve")


def play_prompts(text: str, n: int, tokens: int, seed: int, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """n prompts cut from `text`, each ending at a speaker's name (a seeded choice of them) and starting at the
    earliest speech that keeps it within `tokens` tokens (or cut to its last `tokens` if even its own speaker line
    is longer)."""
    ends = [m.end() for m in SPEAKER.finditer(text)]
    if len(ends) < n:
        raise ValueError(f"serve.requests={n}: the held-out text has only {len(ends)} speeches to end prompts at")
    rng = random.Random(seed)
    picks = sorted(rng.sample(ends, n))
    prompts = []
    for end in picks:
        found = text.rfind("\n\n", 0, max(0, end - 4 * tokens))  # a speech's start, ~4 characters a token
        start = 0 if found < 0 else found + 2
        ids = encode(text[start:end])
        while len(ids) > tokens:  # too long: start one speech later
            found = text.find("\n\n", start, end)
            if found < 0:
                ids = ids[-tokens:]
                break
            start = found + 2
            ids = encode(text[start:end])
        prompts.append(ids)
    return prompts


def read_workload(path: str, cfg: ServeConfig, sampling: Sampling,
                  encode: Callable[[str], list[int]]) -> list[Request]:
    """The requests of a JSONL file, one a line; raises ValueError naming the line and field of a bad one."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"serve.workload={path} does not exist; give a JSONL file, one request a line")
    requests = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"serve.workload line {n}: not JSON ({e.msg})")
        unknown = set(row) - REQUEST_FIELDS if isinstance(row, dict) else {"(not an object)"}
        if unknown or not isinstance(row.get("prompt"), str):
            raise ValueError(f"serve.workload line {n}: needs a string 'prompt'; unknown fields {sorted(unknown)}; "
                             f"allowed: {sorted(REQUEST_FIELDS)}")
        sample = Sampling(row.get("temperature", sampling.temperature), row.get("top_k", sampling.top_k),
                          row.get("top_p", sampling.top_p), row.get("seed", sampling.seed + n))
        requests.append(Request(encode(row["prompt"]), row.get("max_tokens", cfg.max_tokens), sample,
                                stop=tuple(row.get("stop", cfg.stop)),
                                max_cache_tokens=row.get("max_cache_tokens", cfg.max_cache_tokens),
                                protected_window_size=row.get("protected_window_size", cfg.protected_window_size),
                                compress_once=row.get("compress_once", True), cache=row.get("cache", cfg.cache)))
    if not requests:
        raise ValueError(f"serve.workload={path} holds no request")
    return requests


def make_workload(cfg: ServeConfig, sampling: Sampling, held_out_text: Callable[[], str],
                  encode: Callable[[str], list[int]]) -> list[Request]:
    """The workload file's requests, or `cfg.requests` prompts cut from the held-out text, each sampled as
    `sampling` says with its own seed (sampling.seed + its index)."""
    if cfg.workload is not None:
        return read_workload(cfg.workload, cfg, sampling, encode)
    prompts = play_prompts(held_out_text(), cfg.requests, cfg.prompt_tokens, cfg.seed, encode)
    return [Request(p, cfg.max_tokens, replace(sampling, seed=sampling.seed + i), stop=tuple(cfg.stop),
                    max_cache_tokens=cfg.max_cache_tokens, protected_window_size=cfg.protected_window_size,
                    cache=cfg.cache)
            for i, p in enumerate(prompts)]


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    """Seconds after the start: all 0 without a rate, else a Poisson process (exponential gaps of mean 1/rate)."""
    if rate is None:
        return [0.0] * n
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def serve(engine: Engine, requests: list[Request], arrivals: list[float]) -> tuple[list[Completion], float]:
    """Run the workload: each request joins the engine at its arrival time. Returns the completions in the
    requests' order and the wall seconds from the start to the last token."""
    order = sorted(range(len(requests)), key=lambda i: arrivals[i])
    start, ids, done = time.perf_counter(), {}, {}
    with tqdm(total=len(requests), desc="requests", unit="req") as bar:
        while len(done) < len(requests):
            now = time.perf_counter() - start
            while order and arrivals[order[0]] <= now:
                i = order.pop(0)
                ids[engine.add(requests[i], arrived=start + arrivals[i])] = i
            if not engine.has_work():  # idle until the next arrival
                time.sleep(max(0.0, arrivals[order[0]] - now))
                continue
            for c in engine.step():
                done[ids[c.id]] = c
                bar.update()
    return [done[i] for i in range(len(requests))], time.perf_counter() - start


def random_workload(n: int, vocab: int, prompts: tuple[int, int] = (128, 512), new: tuple[int, int] = (64, 128),
                    seed: int = 0) -> list[Request]:
    """n greedy requests of random tokens (benchmarks: random weights need no text), prompt lengths and new tokens
    drawn uniformly from the inclusive ranges; max_tokens is the only stop."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompts[0], prompts[1] + 1, (n,), generator=g)
    wanted = torch.randint(new[0], new[1] + 1, (n,), generator=g)
    return [Request(torch.randint(0, vocab, (int(T),), generator=g).tolist(), int(k), Sampling(temperature=0.0))
            for T, k in zip(lengths, wanted)]


def percentiles(values: list[float], name: str) -> dict[str, float]:
    """p50, p90 and p99 of `values` (nearest rank), keyed name_p50 ..."""
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]  # noqa: E731
    return {f"{name}_p{int(q * 100)}": pick(q) for q in (0.5, 0.9, 0.99)} if ordered else {}


def summary(engine: Engine, done: list[Completion], seconds: float) -> dict[str, float]:
    """The workload's figures: throughput, latencies (percentiles), the engine's batch, blocks and preemptions."""
    out_tokens = sum(len(c.tokens) for c in done)
    tpot = [c.time_per_output_token for c in done if c.time_per_output_token is not None]
    stats = engine.stats
    return {"requests": len(done), "seconds": seconds, "requests_per_s": len(done) / seconds,
            "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / seconds,
            "prompt_tokens": sum(c.prompt_tokens for c in done),
            "decode_tokens_per_s": stats.decode_tokens_per_s, "mean_running_batch": stats.mean_running_batch,
            "peak_blocks": stats.peak_blocks, "pool_blocks": engine.pool.n_blocks,
            "peak_kv_bytes": stats.peak_blocks * engine.pool.block_bytes(), "preemptions": stats.preemptions,
            "blocks_evicted": stats.blocks_evicted, "prefix_hit_tokens": stats.prefix_hit_tokens,
            "prefill_steps": stats.prefill_steps, "decode_steps": stats.decode_steps,
            **percentiles([c.time_to_first_token for c in done], "ttft_s"),
            **percentiles(tpot, "tpot_s"), **percentiles([c.latency for c in done], "latency_s")}


def plot_latency_cdf(done: list[Completion], path: Path, title: str) -> Path:
    """The CDF of end-to-end latency (and of time to first token) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for values, label in (([c.latency for c in done], "end-to-end latency"),
                          ([c.time_to_first_token for c in done], "time to first token")):
        ordered = sorted(values)
        ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label)
    ax.set(xlabel="seconds", ylabel="share of requests", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
