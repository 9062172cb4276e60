"""Prefix caching: the full blocks of a prompt stay in the pool after their sequence is gone, found again by a
chained hash, so a later prompt that starts with the same tokens skips their prefill (vLLM's automatic prefix
caching, at the granularity of our block tables).

    block i of a prompt  ──hash(hash of block i-1, the preset, its block_tokens tokens)──▶  its blocks in the pool
                                                                                            (one per layer, KV head)

A block's hash covers every token before it (through the chain) and the preset, so the same tokens after a
different beginning, or under another preset, never match. An entry holds its blocks once (reference counts,
cache/blocks.py); a sequence that adopts them holds them once more, so they outlive both. Only full blocks are
shared, and a sequence writes only past them (its next token opens a block of its own), so a shared block never
changes. Requests with a KV-Compress budget neither adopt nor leave blocks: compaction moves tokens inside a
head's blocks.

Entries are kept in least-recently-used order. When the scheduler is short of free blocks it reclaims the oldest
entries that no running sequence holds; an entry that a sequence still holds stays, and what it holds is not free
anyway. A match touches its chain from the last block to the first, so a prefix's first blocks are evicted last
(a chain without its first block matches nothing). A sequence that leaves, finished or preempted, leaves its
full blocks too, its output's included: a follow-up that repeats the conversation, or the preempted sequence
prefilled again, finds them.
"""

import hashlib
from collections import OrderedDict

import numpy as np

from cache.model_cache import ModelCache
from cache.pool import BlockPool


class PrefixCache:
    """Full prompt blocks by chained hash: (n_layer, n_kv_head) block ids per entry, in LRU order."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()  # hash -> (n_layer, H_kv) block ids

    def hashes(self, tokens: list[int], salt: str, n: int) -> list[bytes]:
        """The chained hashes of the first n full blocks of `tokens`."""
        bt, out, prev = self.pool.block_tokens, [], salt.encode()
        for i in range(n):
            prev = hashlib.blake2b(prev + np.asarray(tokens[i * bt : (i + 1) * bt], dtype=np.int64).tobytes(),
                                   digest_size=16).digest()
            out.append(prev)
        return out

    def match(self, tokens: list[int], salt: str) -> list[np.ndarray]:
        """The blocks of the longest cached run of `tokens`' first full blocks, leaving at least one token to
        prefill (its logits pick the next token): (n_layer, H_kv) ids per block, in order."""
        found = []
        for h in self.hashes(tokens, salt, (len(tokens) - 1) // self.pool.block_tokens):
            if h not in self.entries:
                break
            found.append(h)
        for h in reversed(found):  # most recently used: the first block last
            self.entries.move_to_end(h)
        return [self.entries[h] for h in found]

    def insert(self, tokens: list[int], salt: str, cache: ModelCache, row: int = 0) -> None:
        """Keep the full blocks of row `row` of `cache`, which stores `tokens` (every head the same length): a
        prompt just prefilled, or all a sequence stored when it leaves."""
        n = len(tokens) // self.pool.block_tokens
        tables = np.stack([layer.store.tables[row, :, :n].numpy() for layer in cache.layers])  # (n_layer, H_kv, n)
        hashes = self.hashes(tokens, salt, n)
        for i, h in enumerate(hashes):
            if h not in self.entries:
                self.entries[h] = tables[:, :, i].copy()  # (n_layer, H_kv)
                self.pool.hold(self.entries[h].ravel())
        for h in reversed(hashes):  # most recently used: the first block last
            self.entries.move_to_end(h)

    def reclaimable(self) -> int:
        """Blocks that evicting every entry no sequence holds would free."""
        return sum(ids.size for ids in self.entries.values() if self._only_here(ids))

    def reclaim(self, n: int) -> int:
        """Evict the least recently used entries that no sequence holds until n blocks are free again (or none is
        left); returns the blocks freed."""
        freed = 0
        for h in list(self.entries):
            if freed >= n:
                break
            if self._only_here(self.entries[h]):
                ids = self.entries.pop(h)
                self.pool.release(ids.ravel())
                freed += ids.size
        return freed

    def _only_here(self, ids: np.ndarray) -> bool:
        return all(self.pool.refs[int(i)] == 1 for i in ids.flat)
