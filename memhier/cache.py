"""The memhier config group, and the builder of a ModelCache whose blocks live in device/host/disk tiers.

    cache = make_cache(cache_spec, memhier_spec, model_config, batch_size, device, dtype, model_id)  # on or off
    logits = cache.prefill(model, prompt_ids)   # with memhier.persist: load the stored prefix, compute the rest

The layers are build_cache's, over a TieredPool (memhier/frames.py) whose blocks live in the tiers of one
TieredStore (memhier/store.py); retrieval and attention demotion give each layer's store a Retriever
(memhier/retrieval.py) that chooses and ranks its blocks. With `persist`, a PrefixStore (memhier/persist.py) keeps
the prompt's blocks across runs under content addresses, one entry per block of the prompt (table column j of every
layer, row and KV head): prefill() loads the longest stored run of them into fresh blocks of every layer, advances
the positions past them (RoPE counts every token, reused or computed), runs the model on the remaining tokens only,
and then writes the whole blocks it computed.
"""

import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from cache.base import LayerCache
from cache.model_cache import ModelCache, Rows
from cache.presets import CacheSpec, build_cache, check_spec
from memhier.frames import TieredPool
from memhier.persist import PrefixStore, block_addresses, root_address
from memhier.retrieval import Retriever
from memhier.tiers import DiskTier, MemoryTier
from toymodel.config import ModelConfig
from toymodel.ranges import NON_NEGATIVE, POSITIVE, check_ranges

MODES = ("exact", "retrieval")
DEMOTIONS = ("lru", "attention")


@dataclass
class MemhierSpec:
    """Where the cache's blocks live (the `memhier` config group). Budgets are bytes per tier, whole cache. Each
    number declares its valid range (toymodel/ranges.py); check_memhier tests those, then how the fields combine.

    enabled:       False builds the plain in-memory cache (memhier=off)
    group_bytes:   the tiers move the blocks a layer allocates at once (of cache.block_tokens tokens each) in groups
                   of at most this many bytes, and at least one block (one blob, one disk file each): a disk read's
                   fixed cost is paid per group, and retrieval brings in every group holding a chosen block
    device_bytes:  the device tier (on a CPU-only machine an in-memory tier with this budget)
    host_bytes:    host memory (pinned when the cache lives on a GPU)
    disk_bytes:    the spill directory; when it is full, the run stops with an error (every block is needed)
    spill_dir:     where this run's spill directory is created (removed at exit); None: the system temp dir
    prefetch:      exact mode: fetch layer i + 1's blocks on a background thread while layer i computes
    mode:          exact (every block, every step) | retrieval (sinks + local window + top-k blocks per step)
    topk_blocks:   retrieval: blocks chosen by their representatives' score, per KV head, per decode step
    sink_blocks:   retrieval: the first blocks, always read (attention sinks)
    local_blocks:  retrieval: the most recent full blocks, always read (with the open block: the local window)
    rep_keys:      retrieval and attention demotion: representative keys per block and KV head (largest norm), at
                   most cache.block_tokens
    demotion:      which group leaves a full tier first: lru, or attention (the one whose best block this step's
                   queries score lowest against its representative keys; InfLLM-style, as retrieval scores them)
    persist:       keep the prompt's blocks in persist_dir under content addresses and reuse stored prefixes
    persist_dir:   the persistent prefix store, kept across runs and shared by processes
    persist_bytes: its budget; least recently used entries are evicted to stay within it
    """

    enabled: bool = False
    group_bytes: int = field(default=32 * 1024, metadata=POSITIVE)
    device_bytes: int = field(default=48 * 1024, metadata=NON_NEGATIVE)  # 0: the tier is not used
    host_bytes: int = field(default=96 * 1024, metadata=NON_NEGATIVE)
    disk_bytes: int = field(default=1024**3, metadata=NON_NEGATIVE)
    spill_dir: str | None = None
    prefetch: bool = True
    mode: str = "exact"
    topk_blocks: int = field(default=8, metadata=NON_NEGATIVE)
    sink_blocks: int = field(default=1, metadata=NON_NEGATIVE)
    local_blocks: int = field(default=2, metadata=NON_NEGATIVE)
    rep_keys: int = field(default=4, metadata=POSITIVE)  # at most cache.block_tokens (check_memhier)
    demotion: str = "lru"
    persist: bool = False
    persist_dir: str = ".cache/kvlab/prefix"
    persist_bytes: int = field(default=1024**3, metadata=NON_NEGATIVE)


class TieredModelCache(ModelCache):
    """A ModelCache whose layers keep their blocks in `pool`'s tiers; memory_bytes() adds each tier's bytes. With a
    `prefix` store and its chain `root`, prefill() reuses stored prompt prefixes."""

    def __init__(self, layers: list[LayerCache], pool: TieredPool, batch_size: int, n_kv_head: int, head_dim: int,
                 device: torch.device, prefix: PrefixStore | None = None, root: bytes = b"", rows: Rows | None = None):
        super().__init__(layers, batch_size, n_kv_head, head_dim, device, rows)
        self.pool, self.store, self.block_tokens = pool, pool.store, pool.block_tokens
        self.prefix, self.root = prefix, root
        self.reused_blocks = self.skipped_tokens = 0

    @torch.inference_mode()
    def prefill(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Feed the prompt ids (B, T) through this empty cache -> logits (B, T - reused tokens, vocab).

        With a prefix store: load the longest run of stored whole blocks (never the block holding the last token,
        whose logits pick the first new token; KIVI, GEAR: whole flushes of the residual), then compute only the
        rest. A missing or damaged entry ends the run there: its tokens are recomputed, never read from a bad file.
        Every damaged entry of the prompt past that point is deleted before the computed blocks are written, so one
        run rewrites them all.
        """
        if self.tokens_seen():
            raise ValueError(f"prefill needs an empty cache, this one has seen {self.pos.tolist()} tokens; make a "
                             f"new one")
        if self.prefix is None:
            return model(ids, self)
        addresses = block_addresses(self.root, ids, self.block_tokens)
        size = len(self.layers) * self.pool.blob_bytes(self.batch_size * self.n_kv_head)  # every layer's blob
        entries = []
        for address in addresses[: self._reusable(ids.shape[1])]:
            entry = self.prefix.load(address, size)  # (size,) uint8 or None
            if entry is None:
                break
            entries.append(entry.view(len(self.layers), -1))  # (n_layer, nbytes)
        unit = self.layers[0].store.prefix_unit
        self.reused_blocks = len(entries) // unit * unit
        for address in addresses[self.reused_blocks :]:  # computed below, then written
            self.prefix.discard_damaged(address, size)
        if self.reused_blocks:
            self._load(entries[: self.reused_blocks])
        self.skipped_tokens = self.reused_blocks * self.block_tokens
        self.skip(self.skipped_tokens)  # positions of the computed tokens count the reused ones
        logits = model(ids[:, self.skipped_tokens :], self)
        whole = int(self.layers[0].store.lengths.min()) // self.block_tokens  # blocks in the pool (KIVI: flushed)
        computed = list(range(self.reused_blocks, min(len(addresses), whole)))
        for j, blobs in zip(computed, self.prompt_blobs(computed) if computed else []):
            self.prefix.save(addresses[j], blobs)
        self.prefix.touch(addresses)
        return logits

    def _reusable(self, T: int) -> int:
        """The most blocks a T-token prompt may reuse: never the block holding its last token, and with a chooser
        never all but that token (one token would run as a decode step, of which retrieval reads only some
        blocks); a whole number of prefix units (KIVI, GEAR: flushes of the residual)."""
        n = (T - 1) // self.block_tokens
        if self.layers[0].store.chooser is not None and n * self.block_tokens == T - 1:
            n -= 1
        unit = self.layers[0].store.prefix_unit
        return max(n, 0) // unit * unit

    def _load(self, entries: list[torch.Tensor]) -> None:
        """Start every layer with the blocks of `entries` (each (n_layer, nbytes): one column of every layer's
        (row, KV head) blocks), in fresh blocks of the pool."""
        B, H_kv, n = self.batch_size, self.n_kv_head, len(entries)
        for i, layer in enumerate(self.layers):
            self.pool.open(layer.store, np.zeros(0, dtype=np.int64))  # a step of this layer: its new blocks in frames
            ids = self.pool.allocate(n * B * H_kv)  # column after column
            self.pool.write_blobs(ids, [entry[i] for entry in entries])
            layer.store.adopt(ids.reshape(n, B, H_kv).transpose(1, 2, 0), hold=False)  # (B, H_kv, n)
            if layer.store.chooser is not None:  # the loaded blocks' representatives, while they are in frames
                layer.store.chooser.stored(layer.store)

    def prompt_blobs(self, columns: list[int]) -> list[list[torch.Tensor]]:
        """The bytes persisted for each block j of `columns`: every layer's blob of table column j (its rows' and
        KV heads' blocks, in that order), brought in layer by layer."""
        blobs = [[] for _ in columns]
        for layer in self.layers:
            ids = layer.store.tables.numpy()[:, :, columns]  # (B, H_kv, m)
            self.pool.open(layer.store, ids.ravel())
            for i, out in enumerate(blobs):
                out.append(self.pool.read_blob(ids[:, :, i].ravel()))
        return blobs

    def memory_bytes(self) -> dict[str, int]:
        """{"device": the layers' own tensors (frames holding a step's only copy, block tables, retrieval's
        representatives) + device tier, "host": host tier, "disk": disk tier} in real bytes."""
        total = super().memory_bytes()
        for tier, n in self.store.tier_bytes().items():
            total[tier] = total.get(tier, 0) + n
        return total

    def figures(self) -> dict[str, float]:
        """The base figures (kv_bytes counts every tier) plus the store's, flattened: memhier_disk_hits, ..."""
        flat = {}
        for name, value in self.store.stats().items():
            if isinstance(value, dict):  # {"device": ..., "host": ...} or per-tier counters
                for tier, v in value.items():
                    for counter, n in (v.items() if isinstance(v, dict) else [("", v)]):
                        flat["_".join(p for p in ("memhier", tier, name if not counter else counter) if p)] = n
            else:
                flat[f"memhier_{name}"] = value
        if self.prefix is not None:
            flat |= {"memhier_prefix_reused_blocks": self.reused_blocks,
                     "memhier_prefill_tokens_skipped": self.skipped_tokens,
                     **{f"memhier_prefix_{k}": v for k, v in self.prefix.stats().items()}}
        return {**super().figures(), **flat}

    def close(self) -> None:
        """Stop the prefetch thread and delete the spill directory (a persistent prefix store stays)."""
        self.store.close()


def check_memhier(spec: MemhierSpec, cache_spec: CacheSpec) -> None:
    """Raise a ValueError naming the field and the fix for every combination memhier cannot run."""
    if cache_spec.merge != "none":
        raise ValueError(f"memhier=on cannot hold cache={cache_spec.name} (merge={cache_spec.merge}): MiniCache's "
                         f"tokens are shared by two layers, not kept in blocks; use memhier=off")
    check_ranges(spec, "memhier")  # each number alone, as MemhierSpec declares it; then how they combine
    if spec.mode not in MODES:
        raise ValueError(f"memhier.mode={spec.mode!r} is not a mode; choose one of {MODES}")
    if spec.demotion not in DEMOTIONS:
        raise ValueError(f"memhier.demotion={spec.demotion!r} is not a demotion policy; choose one of {DEMOTIONS}")
    if cache_spec.policy != "full":  # eviction composes with exact mode and LRU demotion (memhier/frames.py)
        for name, value, fine, why in (
            ("mode", spec.mode, "exact", "retrieval already chooses which blocks to read"),
            ("demotion", spec.demotion, "lru", "a block's representative keys would not follow a compaction"),
            ("persist", spec.persist, False, "a reused prefix would skip the policy's decisions over its tokens"),
        ):
            if value != fine:
                raise ValueError(f"memhier.{name}={value} cannot be combined with the evicting cache="
                                 f"{cache_spec.name} (policy={cache_spec.policy}): {why}; use memhier.{name}={fine} "
                                 f"or a keep-everything preset (full, quant8, quant4, kivi4, kivi2)")
    if spec.rep_keys > cache_spec.block_tokens:  # check_spec has checked cache.block_tokens against the codec
        raise ValueError(f"memhier.rep_keys={spec.rep_keys} must be at most cache.block_tokens="
                         f"{cache_spec.block_tokens} (a block's representative keys are some of its keys)")


def lower_tiers(spec: MemhierSpec, device: torch.device) -> list:
    """The tiers below the device: host memory (pinned when the device is a GPU), then the disk."""
    return [MemoryTier("host", spec.host_bytes, torch.device("cpu"), pin=torch.device(device).type == "cuda"),
            DiskTier(spec.disk_bytes, spec.spill_dir or tempfile.gettempdir())]


def build_tiered_cache(cache_spec: CacheSpec, spec: MemhierSpec, model_config: ModelConfig, batch_size: int,
                       device: torch.device, dtype: torch.dtype, model_id: str | None = None,
                       backend: str = "sdpa") -> TieredModelCache:
    """An empty TieredModelCache: build_cache's layers and kernels over a TieredPool whose blocks (of
    cache.block_tokens) live in device frames, host memory and disk (memhier/frames.py), so that exact mode's output
    is memhier=off's, bit for bit. model_id (e.g. memhier.persist.weights_digest(model)) roots the content
    addresses; persist needs it. backend (the model's) picks the kernel, as build_cache does."""
    check_spec(cache_spec, model_config)
    check_memhier(spec, cache_spec)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if spec.persist and not model_id:
        raise ValueError("memhier.persist=true needs the model's identity for its content addresses: pass "
                         "model_id=memhier.persist.weights_digest(model) to make_cache")
    pool = TieredPool(cache_spec.build_codec(model_config.head_dim), model_config.head_dim, cache_spec.block_tokens,
                      device, dtype, spec.device_bytes, spec.group_bytes, lower_tiers(spec, device), spec.demotion)
    cache = build_cache(cache_spec, model_config, batch_size, device, dtype, backend, pool=pool)
    # retrieval cannot prefetch: the next layer's choice needs a query that does not exist yet
    pool.stores, pool.prefetch = [layer.store for layer in cache.layers], spec.prefetch and spec.mode == "exact"
    if spec.mode == "retrieval" or spec.demotion == "attention":
        for store in pool.stores:
            store.chooser = Retriever(spec.topk_blocks, spec.sink_blocks, spec.local_blocks, spec.rep_keys,
                                      retrieve=spec.mode == "retrieval", rank=spec.demotion == "attention")
    prefix, root = None, b""
    if spec.persist:  # an entry: every layer's blob of one table column of the batch
        prefix = PrefixStore(spec.persist_dir, spec.persist_bytes)
        encoding = {"codec": cache_spec.codec, "group_size": cache_spec.group_size, "residual": cache_spec.residual}
        root = root_address(model_id, dtype, encoding, cache_spec.block_tokens,
                            pool.layout_of(batch_size * model_config.n_kv_head))
    return TieredModelCache(cache.layers, pool, batch_size, model_config.n_kv_head, model_config.head_dim,
                            torch.device(device), prefix, root, rows=cache.rows)


def make_cache(cache_spec: CacheSpec, spec: MemhierSpec, model_config: ModelConfig, batch_size: int,
               device: torch.device, dtype: torch.dtype, model_id: str | None = None,
               backend: str = "sdpa", max_tokens: int | None = None) -> ModelCache:
    """The plain cache (memhier off) or the tiered one (memhier on), for the same cache preset. `max_tokens`, the
    most tokens a sequence will hold, sizes a block pool up front (memhier=off)."""
    if not spec.enabled:
        if spec.persist:
            raise ValueError("memhier.persist=true keeps blocks in memhier's tiers: add memhier=on")
        return build_cache(cache_spec, model_config, batch_size, device, dtype, backend, max_tokens)
    return build_tiered_cache(cache_spec, spec, model_config, batch_size, device, dtype, model_id, backend)
