"""The serving engine: many requests, one model, one block pool, continuous batching.

    engine = Engine(model, cache="full", kv_bytes=64 * 2**20)
    done = engine.generate([Request(prompt=ids, max_tokens=64), ...])   # or: engine.add(request); engine.step()

Where `serving.generate` decodes one batch from start to end, the engine runs a loop of steps, each decided by the
scheduler (serving/scheduler.py): a prefill of newly admitted sequences or a decode step of every running one.
The running batch is one ModelCache whose rows are the running sequences, in order, all in the engine's block
pool: a prefill builds a cache for an admitted sequence in that pool and appends its row (`ModelCache.extend`,
no copy: the blocks change hands), and a finished or preempted sequence's row is dropped and its blocks freed
(`ModelCache.drop_rows`). Rows of different lengths decode together: the decode kernel reads each (sequence, KV
head)'s own blocks and length.

A request's greedy output does not depend on its batch: every kernel of a step computes each row on its own (the
decode kernel one (sequence, KV head) at a time, the matmul one row at a time), so its tokens are those it would
get alone from `serving.generate` (tests/serving/test_engine.py checks it, preemptions included).

Per-request budgets: a request with `max_cache_tokens` is compressed right after its prefill by KV-Compress's rule
(serving/kvcompress.py), so its heads hold different numbers of tokens and its evicted blocks serve other requests;
with `compress_once=False` its keys keep scoring while it decodes, and it is compressed again whenever it has
grown by a block per (layer, KV head) past its budget.
`free_evicted=False` is the counterfactual that shows where the gain comes from: the same tokens are evicted (so
attention reads as few), but the sequence keeps holding as many blocks as it freed until it leaves, so no more
sequences run at once than with every token kept.

KIVI and GEAR keep each sequence's newest tokens in a full-precision residual beside its blocks
(cache/residual.py); the engine charges every sequence the residual's bytes in blocks of the pool, so `kv_bytes`
bounds all the KV memory, and keeps no prefix cache for them (which tokens wait unencoded depends on where a
prompt ends, so a shared prefix would change the output).

Evicting presets (window, sink, h2o, snapkv, l2norm): a policy's per-token state and its knobs belong to a batch
(cache/base.py), so each such preset's requests run in a cohort of their own, a second running cache in the same
pool that every decode step runs too (a forward per cohort). Rows join and leave a cohort with their state, and
each row evicts when its own turn comes, so a request's output is its output alone, unless it is preempted: it is
recomputed from its tokens, and a prefill of them may keep other tokens than its decode steps kept.

Caution: one engine serves the presets whose blocks are its pool's (the same codec, group size and block size),
and MiniCache's in none. Pass a model ready for inference (toymodel/decode_layout.pack_for_decode for speed on a
CPU).
"""

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from cache.model_cache import ModelCache
from cache.presets import PRESETS, CacheSpec, build_cache, build_pool
from serving.generate import greedy
from serving.kvcompress import RunningScores, budget_blocks, compress, unwatch, watch_prefill
from serving.prefix import PrefixCache
from serving.scheduler import Scheduler
from serving.sequence import Request, Sequence, Status

# Decode steps of the running batch's growth that admission keeps free by default: on the serving issue's workload
# (python -m bench.serving_budget, docs/07_serving.md) 64 steps cut preemptions from 12 to 2 (full, as fast) and
# from 31 to 8 (KV-Compress at 8x, a quarter less time).
HEADROOM = 64


@dataclass
class Completion:
    """A finished request: its new tokens and what happened to it (times in seconds)."""

    id: int
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "length" or "stop"
    preemptions: int
    time_to_first_token: float
    latency: float  # from its arrival to its last token

    @property
    def time_per_output_token(self) -> float | None:
        """Seconds per token after the first (None for a one-token answer)."""
        n = len(self.tokens) - 1
        return (self.latency - self.time_to_first_token) / n if n else None


@dataclass
class EngineStats:
    """What the engine did: steps of each kind, the time they took, tokens they made, preemptions, peak blocks."""

    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    blocks_evicted: int = 0  # by KV-Compress budgets and the evicting presets' policies
    prefix_hit_tokens: int = 0  # prompt tokens whose prefill a prefix-cache hit skipped
    peak_blocks: int = 0  # in use, the prefix cache's included
    batch_sizes: list[int] = field(default_factory=list)  # running sequences at each decode step

    @property
    def mean_running_batch(self) -> float:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    """Continuous batching over one block pool of `kv_bytes` (or `n_blocks` blocks) in the `cache` preset.
    `max_batch` caps the running sequences, `max_prefill_tokens` the prompt tokens of one prefill step (a longer
    prompt is prefilled alone, in forwards of that many tokens, so a prefill's activations stay bounded).
    `decode` (ids -> text, a tokenizer's) lets requests stop at strings. `max_context`: the longest prompt accepted
    (None: the model's block_size, the context it was trained on). `reserve`: admit only what can grow to its
    max_tokens without preempting anyone (serving/scheduler.py). `headroom`: admission leaves free the blocks the
    running sequences take over their next `headroom` decode steps (0: only the next step's). `free_evicted=False`:
    a sequence keeps the blocks its KV-Compress budget freed (the masking counterfactual: see the module's
    docstring)."""

    def __init__(self, model: torch.nn.Module, cache: str | CacheSpec = "full", kv_bytes: int = 64 * 2**20,
                 n_blocks: int | None = None, max_batch: int = 64, max_prefill_tokens: int = 4096,
                 decode: Callable[[list[int]], str] | None = None, max_context: int | None = None,
                 reserve: bool = False, headroom: int = HEADROOM, free_evicted: bool = True,
                 prefix_caching: bool = True):
        if isinstance(cache, str) and cache not in PRESETS:
            raise ValueError(f"cache={cache!r} is not a preset; choose among {', '.join(PRESETS)}")
        self.preset = PRESETS[cache] if isinstance(cache, str) else cache  # what a request gets by default
        self.spec = replace(self.preset, policy="full")  # the pool's blocks, kept whole: eviction is per request
        self.model, self.decode = model, decode
        self.free_evicted = free_evicted
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        config = model.config
        if n_blocks is None:  # the bytes of one block, from a pool of one
            n_blocks = kv_bytes // build_pool(self.spec, config, 1, self.device, self.dtype).block_bytes()
        if n_blocks < 1 or max_batch < 1 or max_prefill_tokens < 1:
            raise ValueError(f"the engine needs at least one block, one sequence and one prefill token: got "
                             f"{n_blocks} blocks, max_batch={max_batch}, max_prefill_tokens={max_prefill_tokens}")
        if headroom < 0:
            raise ValueError(f"headroom={headroom}: the decode steps of growth admission keeps free must be >= 0")
        self.pool = build_pool(self.spec, config, n_blocks, self.device, self.dtype)
        residual = self.pool.codec.residual  # KIVI, GEAR: K and V of R tokens per (layer, KV head), model's dtype
        residual_bytes = 2 * residual * config.head_dim * self.dtype.itemsize * config.n_layer * config.n_kv_head
        self.prefix = PrefixCache(self.pool) if prefix_caching and not residual else None
        self.scheduler = Scheduler(self.pool, config.n_layer, config.n_kv_head, max_batch, max_prefill_tokens,
                                   reserve, self.prefix.reclaim if self.prefix else None,
                                   residual, -(-residual_bytes // self.pool.block_bytes()), headroom,
                                   self.prefix.reclaimable if self.prefix else None)
        self.max_context = config.block_size if max_context is None else max_context
        # The running batch: one cache per cohort, a row per running sequence, in order. Cohort None keeps every
        # token (KV-Compress budgets included); an evicting preset's requests run in a cohort of their own.
        self.caches: dict[str | None, ModelCache] = {}
        self.scores = RunningScores(config.n_layer, config.n_kv_head)  # cohort None's rows, for KV-Compress
        self.stats = EngineStats()
        self._ids = 0

    def add(self, request: Request, arrived: float | None = None) -> int:
        """Queue a request that arrived at `arrived` (time.perf_counter seconds; None: now); returns its id.
        Raises ValueError for a request the engine cannot serve.

        A request may name its own preset (`request.cache`) when its blocks are the engine's (the same codec and
        block size): a keep-everything preset runs as it is, `kvcompress` as a KV-Compress budget of its `budget`
        tokens with its `window` protected (the request's own max_cache_tokens and protected_window_size win), and
        another evicting preset (window, sink, h2o, snapkv, l2norm) in the cohort of that preset's requests, a
        batch of its own that each decode step runs too. A preset in another codec is refused with the reason: a
        pool holds one kind of block, so such a request needs an engine of its own."""
        request, evicting = self._resolve_preset(request)
        seq = Sequence.of(self._ids, request, self.device)
        seq.evicting = evicting
        if len(request.prompt) > self.max_context:
            raise ValueError(f"prompt: {len(request.prompt)} tokens, more than the engine's max_context="
                             f"{self.max_context} (default: the block_size the model was trained on)")
        self.scheduler.check_fits(seq)
        seq.arrived = seq.arrived if arrived is None else arrived
        self._ids += 1
        self.scheduler.waiting.append(seq)
        return seq.id

    def _resolve_preset(self, request: Request) -> tuple[Request, CacheSpec | None]:
        """The request with its preset's knobs applied, and the evicting preset it runs under (None: the cohort
        that keeps every token; see add)."""
        if request.cache is not None and request.cache not in PRESETS:
            raise ValueError(f"cache={request.cache!r} is not a preset; choose among {', '.join(PRESETS)}")
        spec = self.preset if request.cache is None else PRESETS[request.cache]
        blocks = lambda s: (s.codec, s.group_size, s.residual, s.block_tokens)  # noqa: E731  what a pool's blocks hold
        if blocks(spec) != blocks(self.spec):
            raise ValueError(f"cache={spec.name}: its blocks (codec, group_size, residual, block_tokens = "
                             f"{blocks(spec)}) are not this engine's {blocks(self.spec)}; serve it from an engine "
                             f"built with cache={spec.name}")
        if self.pool.codec.residual and (spec.policy != "full" or request.max_cache_tokens is not None):
            raise ValueError(f"max_cache_tokens: cache={spec.name} keeps a residual of recent tokens unencoded and "
                             f"encodes older ones in groups that span tokens, so it cannot evict; use a budget with "
                             f"full, quant8 or quant4")
        if spec.policy == "full":
            return request, None
        if spec.policy != "kvcompress":
            if request.max_cache_tokens is not None or request.protected_window_size is not None:
                raise ValueError(f"max_cache_tokens, protected_window_size: cache={spec.name} evicts by its own "
                                 f"budget and window; a KV-Compress budget goes with a preset that keeps every token")
            return request, spec
        budget = spec.budget if request.max_cache_tokens is None else request.max_cache_tokens
        window = spec.window if request.protected_window_size is None else request.protected_window_size
        return replace(request, max_cache_tokens=budget, protected_window_size=window), None

    def abort(self, id: int) -> bool:
        """Drop request `id` wherever it is: out of the queue, or out of the running batch with its blocks freed.
        Returns False when it is not here (finished, or never added)."""
        for seq in self.scheduler.waiting:
            if seq.id == id:
                self.scheduler.waiting.remove(seq)
                return True
        for seq in self.scheduler.running:
            if seq.id == id:
                self._drop([seq])
                return True
        return False

    def sequences(self) -> dict[int, Sequence]:
        """The requests still here, waiting or running, by id."""
        return {seq.id: seq for seq in (*self.scheduler.waiting, *self.scheduler.running)}

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """One step: a prefill of the admitted sequences, or a decode step of every running one. Returns the
        requests that finished in it."""
        admitted = self.scheduler.admit()
        if admitted:
            self._prefill(admitted)
        else:
            while dropped := self.scheduler.preempt():  # again if blocks shared with others were not freed
                self._drop(dropped, preempted=True)
            if self.scheduler.running:
                self._decode()
        self.stats.peak_blocks = max(self.stats.peak_blocks, self.pool.blocks_in_use())
        done = [seq for seq in self.scheduler.running if seq.status is Status.FINISHED]
        self._drop(done)
        for cohort, seqs in cohorts(self.scheduler.running).items():  # what each row holds and will take next
            for seq, held, nxt in zip(seqs, *self.caches[cohort].row_blocks()):
                seq.held_blocks, seq.next_blocks = held + len(seq.held_back), nxt
        return [completion(seq) for seq in done]

    @property
    def cache(self) -> ModelCache | None:
        """The running rows that keep every token (KV-Compress budgets included)."""
        return self.caches.get(None)

    def generate(self, requests: list[Request], progress: bool = False) -> list[Completion]:
        """Serve `requests` (all arriving now) to the end; their completions in the requests' order."""
        ids = [self.add(request) for request in requests]
        done: dict[int, Completion] = {}
        with tqdm(total=len(ids), desc="requests", unit="req", disable=not progress) as bar:
            while self.has_work():
                finished = self.step()
                done.update((c.id, c) for c in finished)
                bar.update(len(finished))
        return [done[i] for i in ids]

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Each admitted sequence's tokens in a forward of its own, into a cache in the pool whose row then joins
        the running batch. One at a time, because a batch of prompts would be padded to the longest: on a CPU
        that wastes the padding's arithmetic and leaves the fast causal path for a masked one (about half the
        tokens/s at prompts of 128-512 tokens, `python -m bench.serving`)."""
        start, chunk = time.perf_counter(), self.scheduler.max_prefill_tokens
        for seq in seqs:
            seq.held_back += self.pool.allocate(self.scheduler.per_sequence).tolist()  # a residual's bytes (KIVI, GEAR)
            cache = build_cache(seq.evicting or self.spec, self.model.config, 1, self.device, self.dtype,
                                self.model.backend.name, pool=self.pool)
            request = seq.request
            tokens = seq.tokens  # what this prefill stores
            hit = self._adopt_prefix(cache, tokens, self._salt(request)) if self._shares(seq) else 0
            if request.max_cache_tokens is not None:  # KV-Compress: score the keys as the prompt goes through
                scores = watch_prefill(cache, request.protected_window_size)
            ids = torch.tensor([tokens[hit:]], device=self.device)  # (1, T): what no cached block holds
            for s in range(0, ids.shape[1], chunk):  # a prompt longer than a step's budget: in chunks, one cache
                logits = self.model(ids[:, s : s + chunk], cache, last_only=True)  # (1, 1, V)
            self.stats.prefill_tokens += ids.shape[1]
            self._sample([seq], logits[:, -1])
            if self._shares(seq):
                self.prefix.insert(tokens, self._salt(request), cache)
            if request.max_cache_tokens is not None:
                unwatch(cache)
                scores = self._compress([seq], cache, [s[None] for s in scores], rows=[0])  # (1, H_kv, L) each
            if seq.evicting is not None:  # what its policy freed: the blocks of the tokens stored, less those held
                stored = len(cache.layers) * cache.n_kv_head * -(-ids.shape[1] // self.pool.block_tokens)
                self.stats.blocks_evicted += stored - cache.row_blocks()[0][0]
            if seq.cohort is None:  # its scores, if it compresses again, join with its row
                self.scores.extend(scores if seq.rescores else None)
            if seq.cohort in self.caches:
                self.caches[seq.cohort].extend(cache)
            else:
                self.caches[seq.cohort] = cache
        self.stats.prefill_seconds += time.perf_counter() - start
        self.stats.prefill_steps += 1

    def _shares(self, seq: Sequence) -> bool:
        """Whether a sequence's blocks go to and come from the prefix cache (compaction moves tokens)."""
        return self.prefix is not None and seq.request.max_cache_tokens is None and seq.evicting is None

    def _salt(self, request: Request) -> str:
        """What a block's hash starts from: the request's preset, so two presets never share a block."""
        return request.cache or self.preset.name

    def _adopt_prefix(self, cache: ModelCache, tokens: list[int], salt: str) -> int:
        """Start a fresh one-row cache with the cached blocks of the longest prefix of `tokens` it finds; returns
        the tokens they hold (0 on a miss)."""
        blocks = self.prefix.match(tokens, salt)
        if not blocks:
            return 0
        ids = np.stack(blocks, axis=-1)  # (n_layer, H_kv, n)
        for layer, layer_ids in zip(cache.layers, ids):
            layer.store.adopt(layer_ids[None])  # (1, H_kv, n)
        hit = len(blocks) * self.pool.block_tokens
        cache.skip(hit)
        self.stats.prefix_hit_tokens += hit
        return hit

    def _decode(self) -> None:
        """One token for every running sequence: its last one in, the next one out (a forward per cohort)."""
        start = time.perf_counter()
        for cohort, seqs in cohorts(self.scheduler.running).items():
            self._decode_cohort(self.caches[cohort], seqs)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(self.scheduler.running)
        self.stats.batch_sizes.append(len(self.scheduler.running))

    def _decode_cohort(self, cache: ModelCache, seqs: list[Sequence]) -> None:
        """A decode step of `seqs`, the rows of `cache` in order; KV-Compress budgets compress as they grow."""
        ids = torch.tensor([[seq.output[-1]] for seq in seqs], device=self.device)  # (B, 1): the last sampled
        watching = [i for i, seq in enumerate(seqs) if seq.rescores]  # compress_once=False
        if watching:
            self.scores.watch(cache)
        evicting = seqs[0].evicting is not None  # a cohort: its policy evicts as rows fill blocks
        before = sum(map(sum, cache.row_blocks())) if evicting else 0  # held, and what the step's tokens take
        logits = self.model(ids, cache)[:, -1]  # (B, V)
        if evicting:
            self.stats.blocks_evicted += before - sum(cache.row_blocks()[0])
        if watching:
            unwatch(cache)
            held = cache.row_blocks()[0]
            heads = len(cache.layers) * cache.n_kv_head
            due = [i for i in watching  # grown a block per (layer, KV head) past its budget: compress again
                   if held[i] >= max(budget_blocks(cache, seqs[i].request.max_cache_tokens),
                                     seqs[i].compressed_blocks) + heads]
            if due:
                self.scores.set_rows(due, self._compress([seqs[i] for i in due], cache, self.scores.rows(cache, due),
                                                         due))
        self._sample(seqs, logits)

    def _compress(self, seqs: list[Sequence], cache: ModelCache, scores: list[torch.Tensor],
                  rows: list[int]) -> list[torch.Tensor]:
        """Meet each sequence's budget in its row of `cache` (KV-Compress), by `scores` ((len(rows), H_kv, L) per
        layer), and return the scores of the keys they kept, in their new slots; hold back the freed blocks in the
        masking counterfactual."""
        requests = [seq.request for seq in seqs]
        freed, kept = compress(cache, scores, [r.max_cache_tokens for r in requests],
                               [r.protected_window_size for r in requests], rows)
        held = cache.row_blocks()[0]
        for seq, row, n in zip(seqs, rows, freed):
            self.stats.blocks_evicted += n
            if not self.free_evicted:
                seq.held_back += self.pool.allocate(n).tolist()
            seq.compressed_blocks = held[row]
        return kept

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each sequence draws from its row of logits (B, V) with its own sampler (its own seed); the greedy ones
        read one argmax of the whole batch, which picks what each would alone."""
        best = greedy(logits).tolist()  # (B,)
        for i, seq in enumerate(seqs):
            seq.append(best[i] if seq.sampler is greedy else int(seq.sampler(logits[i : i + 1])), self.decode)

    def _drop(self, seqs: list[Sequence], preempted: bool = False) -> None:
        """Remove `seqs` from the running batch and free their blocks: finished ones, or ones the scheduler has
        already re-queued (preempted)."""
        if not seqs:
            return
        gone = {seq.id for seq in seqs}
        # The running caches' rows, in order. Preempted ones the scheduler took out of `running` already: they were
        # the last rows (of their cohorts too), and it hands them over newest first.
        rows = [*self.scheduler.running, *reversed(seqs)] if preempted else self.scheduler.running
        for cohort, members in cohorts(rows).items():
            for row, seq in enumerate(members):
                if seq.id not in gone:
                    continue
                self.pool.release(seq.held_back)
                seq.held_back = []
                if self._shares(seq):  # what it stored: all its tokens but the last one sampled
                    self.prefix.insert(seq.tokens[:-1], self._salt(seq.request), self.caches[cohort], row)
            keep = [seq.id not in gone for seq in members]
            self.caches[cohort].drop_rows(keep)
            if cohort is None:
                self.scores.drop(keep)
        if preempted:
            self.stats.preemptions += len(seqs)
        else:
            self.scheduler.running = [seq for seq in rows if seq.id not in gone]


def cohorts(seqs: list[Sequence]) -> dict[str | None, list[Sequence]]:
    """`seqs` by the cohort their rows lie in, each in order."""
    by_cohort: dict[str | None, list[Sequence]] = {}
    for seq in seqs:
        by_cohort.setdefault(seq.cohort, []).append(seq)
    return by_cohort


def completion(seq: Sequence) -> Completion:
    return Completion(seq.id, len(seq.request.prompt), seq.output, seq.finish_reason, seq.preemptions,
                      seq.first_token - seq.arrived, seq.finished - seq.arrived)
