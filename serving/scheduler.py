"""The scheduler: what the engine does next, counted in blocks of the pool.

Iteration-level scheduling, as Orca introduced it and vLLM and nano-vllm do it: the batch is rebuilt at every step,
so a finished sequence leaves at once and a waiting one joins at the next step, instead of a static batch waiting
for its longest member. Each step is one of two kinds:

    prefill   waiting sequences that fit are admitted, oldest first, and prefilled (each in a forward of its own)
    decode    otherwise every running sequence gets one token (one forward of B tokens); when the step needs
              more blocks than are free, the newest running sequence is preempted first

A sequence holds n_layer * n_kv_head blocks per `block_tokens` tokens it stores (each layer and KV head has its own
block table). It stores its prompt at prefill and one token per decode step (the one sampled the step before), so a
decode step takes a new block for every (layer, KV head) of a sequence whose blocks are full. A running sequence's
counts come from the running cache (`Sequence.held_blocks`, `next_blocks`): after KV-Compress its heads hold
different numbers of tokens. A sequence under an evicting preset (window, sink, h2o, ...) stores at most its budget
and the block it fills past it once its prefill has evicted (`stored`), so it may ask for more new tokens than the
pool could keep.

KIVI and GEAR keep their newest tokens in a full-precision residual beside the blocks (cache/residual.py) and flush
them `residual` at a time: their blocks hold the whole flushes, a step that fills the residual takes residual /
block_tokens blocks per (layer, KV head), and each sequence is charged `per_sequence` blocks for the residual's
bytes, so the pool's bytes are all the KV memory the engine uses.

Admission keeps one rule: the admitted prompts, and the next decode step of everyone, must fit the free blocks.
Then a sequence is never admitted only to be preempted at the very next step; preemption happens only as the
running sequences grow. Preemption is by recompute (its blocks freed, its tokens kept, re-queued at the front):
cheaper to write than swapping blocks out, but the recomputed prefill is paid again.

With a `headroom` of n decode steps, admission also leaves free the blocks the running sequences (and those admitted
before it in the step) take over their next n steps (`growth_ahead`, an estimate; none past a sequence's
max_tokens, nor past an evicting preset's budget and a block): a prompt is not admitted into room that the batch is
about to grow into, only to be preempted a few steps later and prefilled again. Blocks kept for later (the prefix
cache's) count toward the headroom and are never reclaimed for it. vLLM keeps a fixed share of the blocks free for
the same reason (its watermark); counting the batch's own growth keeps more free when more sequences run.

With `reserve`, admission also keeps a promise (as TGI's router does, where vLLM admits optimistically): every
running sequence, and the one admitted, may grow to its max_tokens without running out, counting each at an upper
bound of its last step's blocks (`final_blocks`). Fewer sequences run at once, but none is preempted (short of a
KV-Compress budget that its protected window overrides); on a CPU, where a prefill costs far more than a decode
step, that can be the faster trade (python -m bench.serving_budget measures both).
"""

from collections import deque
from typing import Callable

from cache.pool import BlockPool
from cache.codecs import tokens_to_flush
from serving.sequence import Sequence, Status


class Scheduler:
    """The waiting queue and the running batch (in the order of the running cache's rows) over one block pool."""

    def __init__(self, pool: BlockPool, n_layer: int, n_kv_head: int, max_batch: int, max_prefill_tokens: int,
                 reserve: bool = False, reclaim: Callable[[int], int] | None = None, residual: int = 0,
                 per_sequence: int = 0, headroom: int = 0, reclaimable: Callable[[], int] | None = None):
        self.pool, self.heads = pool, n_layer * n_kv_head  # a block table per (layer, KV head)
        self.residual = residual  # tokens kept beside the blocks, flushed this many at a time (KIVI, GEAR)
        self.per_sequence = per_sequence  # blocks charged to every sequence for them
        self.max_batch, self.max_prefill_tokens, self.reserve = max_batch, max_prefill_tokens, reserve
        self.headroom = headroom  # decode steps of the batch's growth that admission keeps free
        self.reclaim = reclaim  # frees up to n blocks kept for later (the prefix cache's), when short of free ones
        self.reclaimable = reclaimable or (lambda: 0)  # how many of those it could free
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence holds when it stores `tokens` tokens (its residual's charge included)."""
        in_blocks = tokens_to_flush(tokens, self.residual)  # every token, or KIVI's whole flushes
        return self.heads * -(-in_blocks // self.pool.block_tokens) + self.per_sequence

    def growth(self, tokens: int) -> int:
        """At most the blocks `tokens` more tokens take: one per (layer, KV head) every block_tokens tokens, or R /
        block_tokens every R tokens (a residual of R flushes at most ceil(tokens / R) times)."""
        unit = self.residual or self.pool.block_tokens
        return self.heads * -(-tokens // unit) * (unit // self.pool.block_tokens)

    def stored(self, seq: Sequence, tokens: int) -> int:
        """The most tokens `seq` stores per (layer, KV head) until it has seen `tokens`: all of them, or under an
        evicting preset its budget and the block it fills past it, or its whole prefill, before it evicts."""
        if seq.evicting is None:
            return tokens
        prefill = 0 if seq.status is Status.RUNNING else seq.n_tokens  # a waiting sequence is prefilled first
        return min(tokens, max(prefill, seq.evicting.budget + self.pool.block_tokens))

    def check_fits(self, seq: Sequence) -> None:
        """Raise ValueError for a request that could not finish even alone in the pool."""
        longest = self.stored(seq, len(seq.request.prompt) + seq.request.max_tokens - 1)  # at its last step
        if self.blocks_for(longest) > self.pool.n_blocks:
            raise ValueError(f"prompt ({len(seq.request.prompt)} tokens) + max_tokens ({seq.request.max_tokens}) "
                             f"needs {self.blocks_for(longest)} blocks, the pool has {self.pool.n_blocks}: lower "
                             f"max_tokens or give the engine more KV memory")

    def final_blocks(self, seq: Sequence) -> int:
        """An upper bound of the blocks `seq` holds at its last step: those it holds now (a waiting one: its
        prompt's, or as many as its KV-Compress budget leaves, never fewer than its protected window keeps), and
        those the tokens it may still add take (`growth`)."""
        bt = self.pool.block_tokens
        remaining = seq.request.max_tokens - len(seq.output)
        if seq.evicting is not None:  # at most its budget and a block per (layer, KV head)
            return self.blocks_for(self.stored(seq, seq.n_tokens + remaining))
        now = seq.held_blocks
        if seq.status is not Status.RUNNING:
            now = self.blocks_for(seq.n_tokens)
            if seq.request.max_cache_tokens is not None:  # a head keeps its window and a partial group at least
                kept = max(seq.request.max_cache_tokens, seq.request.protected_window_size + bt - 1)
                now = min(now, self.blocks_for(kept))
        return now + self.growth(remaining)

    def growth_ahead(self, seq: Sequence) -> int:
        """An estimate of the blocks `seq` takes over its next `headroom` decode steps beyond those it holds (a waiting
        one: those its prefill is charged), the next step's included: none past its max_tokens; under an evicting
        preset none past its budget and a block; compressed again as it grows (KV-Compress, compress_once=False),
        none: it swings between its budget and a block per (layer, KV head) past it, compressing back each time,
        so a batch of such sequences does not grow step after step (the next step's blocks are counted apart, in
        `admit`). Reserving the swing for each (two blocks per head) held the budget benchmark's batch at 31.5
        sequences, where reserving none ran 48.4 without a preemption and took 0.91x the time (python -m
        bench.serving_budget, docs/07_serving.md). Preemption covers what an estimate misses."""
        if not self.headroom:
            return 0
        steps = min(self.headroom, seq.request.max_tokens - len(seq.output))
        held = seq.held_blocks if seq.status is Status.RUNNING else self.blocks_for(seq.n_tokens)
        if seq.evicting is not None:
            return max(0, self.blocks_for(self.stored(seq, seq.n_tokens + steps)) - held)
        return 0 if seq.rescores else self.growth(steps)

    @staticmethod
    def decode_blocks(seqs: list[Sequence]) -> int:
        """Blocks the next decode step takes: one per (layer, KV head) of every sequence whose blocks are full, or
        a flush's worth where its residual fills (as the engine counted them in the running cache)."""
        return sum(seq.next_blocks for seq in seqs)

    def admit(self) -> list[Sequence]:
        """Waiting sequences to prefill now, oldest first: while the batch has room, their prompts fit the prefill
        token budget (the first always does), and their blocks plus the next decode step's, plus the headroom of
        the sequences before them, fit the free ones."""
        admitted: list[Sequence] = []
        tokens, blocks = 0, self.decode_blocks(self.running)
        ahead = sum(self.growth_ahead(seq) for seq in self.running)
        promised = sum(self.final_blocks(seq) for seq in self.running) if self.reserve else 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            seq = self.waiting[0]
            need = self.blocks_for(seq.n_tokens + 1)  # its prompt and the token its first decode step stores
            final = self.final_blocks(seq) if self.reserve else 0
            if admitted and tokens + seq.n_tokens > self.max_prefill_tokens or not self._free(blocks + need):
                break
            if ahead and blocks + need + ahead > self.pool.n_free + self.reclaimable():
                break  # the headroom may be blocks kept for later: counted, never reclaimed for
            if self.reserve and (self.running or admitted) and promised + final > self.pool.n_blocks:
                break  # (alone it always fits: check_fits)
            tokens, blocks, promised = tokens + seq.n_tokens, blocks + need, promised + final
            ahead += self.growth_ahead(seq)
            admitted.append(self.waiting.popleft())
        for seq in admitted:
            seq.status = Status.RUNNING
        self.running += admitted
        return admitted

    def preempt(self) -> list[Sequence]:
        """Running sequences to drop before a decode step, newest first, until the step fits the free blocks.
        They go back to the front of the queue, oldest first; the engine frees their blocks."""
        dropped: list[Sequence] = []
        self._free(self.decode_blocks(self.running))
        free = self.pool.n_free
        while len(self.running) > 1 and self.decode_blocks(self.running) > free:
            seq = self.running.pop()
            free += seq.held_blocks
            seq.status, seq.preemptions = Status.WAITING, seq.preemptions + 1
            dropped.append(seq)
        self.waiting.extendleft(dropped)  # extendleft reverses: the oldest preempted ends up first
        return dropped

    def _free(self, n: int) -> bool:
        """Whether n blocks are free, after reclaiming what is kept for later if they were not."""
        if n > self.pool.n_free and self.reclaim is not None:
            self.reclaim(n - self.pool.n_free)
        return n <= self.pool.n_free
