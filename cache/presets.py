"""Cache presets: a plain CacheSpec names a policy and a codec; `build_cache` turns it into a ModelCache.

This is the only place that knows names. It checks every combination up front and raises a ValueError saying
what is wrong and how to fix it, so a bad `infer.py cache=...` fails before the model runs. conf/cache/*.yaml
holds one file per entry of PRESETS: full.yaml every field, the others start from it and set what differs
(tests/cache/test_presets.py compares them field by field).

    spec = PRESETS["sink_int4"]         # or dataclasses.replace(PRESETS["h2o"], budget=64), or CacheSpec(...)
    cache = build_cache(spec, model_config, batch_size=1, device=torch.device("cpu"), dtype=torch.float32,
                        backend=model.backend.name)   # the backend picks the kernel that reads stored codes
    logits = model(ids, cache); cache.memory_bytes(); cache.figures()
"""

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cache import codecs
from cache.base import LayerCache, Policy, Store
from cache.blocks import PagedStore
from cache.gear import resolve_rank
from cache.kernels.choose import decode_kernel, paged_kernel
from cache.minicache import MergedLayerStore, PairStore
from cache.model_cache import ModelCache, Rows
from cache.policies import POLICIES, Sink, SnapKV
from cache.pool import BlockPool
from cache.residual import ResidualPagedStore
from cache.storage import BufferStore, CodecStore
from toymodel.config import ModelConfig
from toymodel.ranges import NON_NEGATIVE, POSITIVE, check_ranges


@dataclass
class CacheSpec:
    """One cache configuration. Sizes count tokens per KV head, per layer. Each number declares its valid range
    (toymodel/ranges.py); check_spec tests those, then how the fields combine.

    name:       the preset's name (reports and run names use it)
    policy:     one of POLICIES: full, window, sink, h2o, snapkv, l2norm, kvcompress
    budget:     tokens kept per KV head (kvcompress: on average; the layer keeps budget * n_kv_head); full: unused
    sink:       the first tokens always kept (attention sinks)
    window:     the most recent tokens always kept; snapkv/kvcompress: also the observation window
    codec:      one of cache.codecs.CODECS: fp, fp16, int<bits>, kivi<bits> or gear<bits> with bits in 2, 4, 8
    group_size: elements sharing a scale and zero: channels (int, KIVI and GEAR values) or tokens (their keys)
    residual:   KIVI's recent tokens kept in full precision, a multiple of group_size; GEAR's streaming buffer n_b
                (new tokens wait in full precision, then are compressed one chunk of n_b tokens at a time)
    kernel:     snapkv/kvcompress: width of the pooling window along keys (odd)
    pooling:    snapkv/kvcompress: max or avg
    rank:       GEAR: low-rank factors per chunk and KV head; in (0, 1) a fraction of head_dim (rounded up); 0 none
    outliers:   GEAR: the fraction s of each chunk's entries kept exactly (s/2 largest, s/2 smallest)
    merge:      none, or minicache: cross-layer merging of the pairs of layers (l - 1, l), l = S, S + 2, ...
    merge_start: MiniCache's S, the first layer merged into the one before it, in [1, n_layer); None: n_layer // 2
    merge_t:    MiniCache's SLERP interpolation (0: layer l - 1's direction, 1: layer l's)
    merge_gamma: MiniCache's retention threshold: a token whose normalized angle between the two layers exceeds
                d_min + (d_max - d_min) * gamma stays unmerged, both vectors exact
    block_tokens: tokens per block of the block pool (cache/blocks.py), where every preset but MiniCache lives:
                per-token codecs (fp, fp16, int) with every policy (an evicting one decides once per block), KIVI
                with blocks of a multiple of group_size that divide residual, GEAR with blocks of one chunk
                (block_tokens = residual) (cache/residual.py)
    attend:     fused: a decode step's kernel reads the stored blocks or codes where they lie
                (cache/kernels/choose.py); naive: every step gathers and decodes the cache, then attends (the
                dequantize-then-attend path of research code, which the MLSys 2025 study finds loses throughput)
    """

    name: str = "full"
    policy: str = "full"
    budget: int = field(default=0, metadata=NON_NEGATIVE)
    sink: int = field(default=4, metadata=NON_NEGATIVE)
    window: int = field(default=64, metadata=NON_NEGATIVE)
    codec: str = "fp"
    group_size: int = field(default=32, metadata=POSITIVE)
    residual: int = field(default=128, metadata=NON_NEGATIVE)
    kernel: int = field(default=5, metadata=POSITIVE)
    pooling: str = "max"
    rank: float = field(default=2, metadata=NON_NEGATIVE)
    outliers: float = field(default=0.02, metadata={"range": "[0, 0.5)"})
    merge: str = "none"
    merge_start: int | None = field(default=None, metadata=POSITIVE)  # and below n_layer: check_merge
    merge_t: float = field(default=0.6, metadata={"range": "[0, 1]"})
    merge_gamma: float = field(default=0.05, metadata={"range": "[0, 1]"})
    block_tokens: int = field(default=16, metadata=POSITIVE)
    attend: str = "fused"

    def build_codec(self, head_dim: int | None = None) -> codecs.Codec:
        """The codec named by `codec`, with this spec's knobs (GEAR also needs the model's head_dim). Raises
        ValueError for an unknown codec, or knobs it cannot use."""
        return codecs.make_codec(self.codec, self.group_size, self.residual, self.rank, self.outliers, head_dim)


# Defaults sized for the toy model (block_size 256, head_dim 32): evicting presets keep half the context.
PRESETS: dict[str, CacheSpec] = {
    "full": CacheSpec(),
    "window": CacheSpec(name="window", policy="window", budget=128, sink=0, window=0),
    "sink": CacheSpec(name="sink", policy="sink", budget=128, sink=4, window=0),
    "h2o": CacheSpec(name="h2o", policy="h2o", budget=128, sink=0, window=64),
    "snapkv": CacheSpec(name="snapkv", policy="snapkv", budget=128, sink=0, window=32),
    "l2norm": CacheSpec(name="l2norm", policy="l2norm", budget=128, sink=0, window=32),
    "kvcompress": CacheSpec(name="kvcompress", policy="kvcompress", budget=128, sink=0, window=32),
    "quant8": CacheSpec(name="quant8", codec="int8"),
    "quant4": CacheSpec(name="quant4", codec="int4"),
    "kivi4": CacheSpec(name="kivi4", codec="kivi4", block_tokens=32),  # blocks of whole key groups
    "kivi2": CacheSpec(name="kivi2", codec="kivi2", block_tokens=32),
    "sink_int4": CacheSpec(name="sink_int4", policy="sink", budget=128, sink=4, window=0, codec="int4"),
    "gear4": CacheSpec(name="gear4", codec="gear4", residual=64, block_tokens=64),  # a block: one chunk of n_b
    "gear2": CacheSpec(name="gear2", codec="gear2", residual=64, block_tokens=64),
    "minicache": CacheSpec(name="minicache", merge="minicache", merge_gamma=0.9),  # 0.05 would grow our cache
    "minicache_int4": CacheSpec(name="minicache_int4", merge="minicache", codec="int4", merge_gamma=0.9),
}
MERGES = ("none", "minicache")


def at_budget(spec: CacheSpec, budget: int) -> CacheSpec:
    """An evicting preset keeping `budget` tokens per KV head: its recent (or observation) window cut to at most half
    the budget, so the policy still chooses the other half, and its sinks to what the window leaves."""
    window = min(spec.window, budget // 2)
    return replace(spec, budget=budget, window=window, sink=min(spec.sink, budget - window))


def merge_start(spec: CacheSpec, config: ModelConfig) -> int:
    """MiniCache's start layer S: the spec's, or n_layer // 2."""
    return config.n_layer // 2 if spec.merge_start is None else spec.merge_start


def check_gear(spec: CacheSpec, config: ModelConfig) -> None:
    """What GEAR needs beyond each knob's own range: a streaming buffer, and a rank that fits a chunk."""
    if spec.residual < 1:
        raise ValueError(f"cache.residual={spec.residual} is GEAR's streaming buffer n_b and must be in [1, inf): the "
                         f"tokens kept in full precision until a chunk is compressed (e.g. 64)")
    if spec.rank >= 1 and spec.rank != int(spec.rank):
        raise ValueError(f"cache.rank={spec.rank} must be 0, a fraction of head_dim in (0, 1), or a whole number "
                         f"of factors in [1, head_dim={config.head_dim}] (e.g. 2)")
    if resolve_rank(spec.rank, config.head_dim) > config.head_dim:
        raise ValueError(f"cache.rank={spec.rank} is above head_dim={config.head_dim}: the rank must be in [0, "
                         f"{config.head_dim}], a chunk of head_dim channels has at most that many factors")


def check_merge(spec: CacheSpec, config: ModelConfig) -> None:
    """MiniCache: a known merge, a start layer that makes a pair, and no eviction."""
    if spec.merge not in MERGES:
        raise ValueError(f"cache.merge={spec.merge!r} is not a merge; choose one of {MERGES}")
    if spec.merge == "none":
        return
    if spec.policy != "full":
        raise ValueError(f"cache.merge={spec.merge} cannot be combined with eviction (policy={spec.policy}): the two "
                         f"layers of a pair share one direction per token, so they keep the same tokens; use "
                         f"policy=full")
    start = merge_start(spec, config)
    if not 1 <= start < config.n_layer:
        raise ValueError(f"cache.merge_start={start} must be in [1, n_layer={config.n_layer}): layer S is the first "
                         f"merged into the layer before it (null: n_layer // 2)")


def check_spec(spec: CacheSpec, config: ModelConfig) -> None:
    """Raise a ValueError naming the bad field and the fix for every combination the cache cannot run."""
    check_ranges(spec, "cache")  # each number alone, as CacheSpec declares it; then how they combine
    if spec.policy not in POLICIES:
        raise ValueError(f"unknown cache policy {spec.policy!r}; valid policies: {', '.join(POLICIES)}")
    if spec.attend not in ("fused", "naive"):
        raise ValueError(f"cache.attend={spec.attend!r}; choose fused (a kernel reads the stored codes) or naive "
                         f"(decode the cache, then attend)")
    if spec.codec.startswith("gear"):
        check_gear(spec, config)
    check_merge(spec, config)
    codec = spec.build_codec(config.head_dim)  # raises for unknown codecs, bits, a residual not a multiple of G
    quantized = spec.codec not in ("fp", "fp16")
    if quantized and config.head_dim % spec.group_size != 0:
        raise ValueError(
            f"cache.group_size={spec.group_size} does not divide head_dim={config.head_dim}; "
            f"choose a divisor of {config.head_dim} (e.g. {config.head_dim})"
        )
    if codec.residual > 0 and spec.merge == "none":  # KIVI and GEAR live in the block pool
        problem = codec.block_problem(spec.block_tokens)
        if problem is not None:
            raise ValueError(f"cache.block_tokens={spec.block_tokens} does not fit cache.codec={spec.codec}: "
                             f"{problem}")
    if spec.policy == "full":
        return
    if spec.budget < 1 or spec.budget < spec.sink + spec.window:
        raise ValueError(
            f"cache.budget={spec.budget} must be at least 1 and at least sink + window = {spec.sink} + {spec.window}"
            f" (the tokens every head always keeps); raise the budget or lower sink/window"
        )
    if codec.residual > 0:
        raise ValueError(
            f"cache.codec={spec.codec} cannot be combined with eviction (policy={spec.policy}): KIVI and GEAR quantize "
            f"keys per channel in groups of {spec.group_size} tokens, so single tokens cannot be dropped; use "
            f"int8/int4 with eviction, or policy=full with KIVI or GEAR"
        )
    if spec.policy == "sink" and spec.sink < 1:
        raise ValueError("cache.sink=0 with policy=sink keeps no attention sinks; set cache.sink >= 1 (e.g. 4)")
    if spec.policy in ("h2o", "l2norm") and spec.window < 1:
        raise ValueError(f"policy={spec.policy} needs cache.window >= 1: it ranks tokens by {spec.policy}'s score "
                         f"alone, so without a protected recent window it evicts the token just generated at most "
                         f"decoding steps; set cache.window to at least 1 (e.g. 32)")
    if spec.policy in ("snapkv", "kvcompress"):
        if spec.window < 1:
            raise ValueError(f"policy={spec.policy} needs cache.window >= 1: the window is its observation window")
        if spec.kernel < 1 or spec.kernel % 2 == 0:
            raise ValueError(f"cache.kernel={spec.kernel} must be a positive odd number (e.g. 5)")
        if spec.pooling not in ("max", "avg"):
            raise ValueError(f"cache.pooling={spec.pooling!r} is not a pooling; choose max or avg")


def make_policy(spec: CacheSpec, config: ModelConfig) -> Policy:
    """A fresh policy for one layer (policies hold per-layer state)."""
    cls = POLICIES[spec.policy]
    if issubclass(cls, Sink):
        return cls(spec.budget, spec.sink, spec.window, rope_theta=config.rope_theta)
    if issubclass(cls, SnapKV):
        return cls(spec.budget, spec.sink, spec.window, kernel=spec.kernel, pooling=spec.pooling)
    return cls(spec.budget, spec.sink, spec.window)


def make_store(codec: codecs.Codec, dtype: torch.dtype) -> Store:
    """A contiguous store: full precision in a preallocated buffer, anything encoded in a CodecStore."""
    if codec.full_precision:
        return BufferStore(codec.key.dtype, dtype)
    return CodecStore(codec, dtype)


def on_blocks(spec: CacheSpec, codec: codecs.Codec) -> bool:
    """Whether this combination lives in the block pool: a codec whose payload blocks hold (per-token codes, KIVI's
    whole key groups, GEAR's chunks), unmerged."""
    return codec.block_problem(spec.block_tokens) is None and spec.merge == "none"


def takes_ragged_batches(spec: CacheSpec, config: ModelConfig) -> bool:
    """Whether rows of different lengths can share a batch: the block pool gives each row and head its own length,
    and an evicting policy selects per head when a row's turn comes (StreamingLLM: each row counts its own slots).
    Not MiniCache's contiguous pairs. Raises ValueError for an invalid spec."""
    check_spec(spec, config)
    return on_blocks(spec, spec.build_codec(config.head_dim))


def build_pool(spec: CacheSpec, config: ModelConfig, n_blocks: int, device: torch.device,
               dtype: torch.dtype) -> BlockPool:
    """A fixed pool of `n_blocks` blocks in the preset's codec, for caches to share (the serving engine): it never
    grows, so running out raises MemoryError. Raises ValueError when the preset does not keep every token in the
    block pool."""
    check_spec(spec, config)
    codec = spec.build_codec(config.head_dim)
    if not (on_blocks(spec, codec) and POLICIES[spec.policy].reads == "nothing"):
        raise ValueError(f"cache={spec.name}: a shared block pool takes presets that keep every token in blocks "
                         f"(full, quant8, quant4, kivi4, kivi2, gear4, gear2)")
    return BlockPool(codec, config.head_dim, spec.block_tokens, n_blocks, device, dtype, grow=False)


def build_paged(spec: CacheSpec, codec: codecs.Codec, config: ModelConfig, batch_size: int, device: torch.device,
                dtype: torch.dtype, backend: str, max_tokens: int | None, pool: BlockPool | None) -> ModelCache:
    """A ModelCache whose layers share one BlockPool: `pool` (shared with other caches), or a private one sized
    for `max_tokens` per sequence (None: one block per head to start, doubling when full)."""
    if pool is not None:
        if pool.block_tokens != spec.block_tokens or pool.head_dim != config.head_dim:
            raise ValueError(f"the pool's blocks ({pool.block_tokens} tokens of {pool.head_dim} channels) do not "
                             f"fit cache.block_tokens={spec.block_tokens}, head_dim={config.head_dim}")
        max_tokens = None  # no stretches of its own in a shared pool
    held = max_tokens  # an evicting policy holds at most a block's worth past its budget (a long prefill: more)
    if spec.policy != "full" and max_tokens is not None:  # KV-Compress's heads differ: one more block each
        held = min(max_tokens, spec.budget + spec.block_tokens * (2 if POLICIES[spec.policy].ragged else 1))
    per_head = 1 if held is None else -(-held // spec.block_tokens)  # blocks, rounded up (a longer prefill grows it)
    n_blocks = batch_size * config.n_layer * config.n_kv_head * per_head
    pool = BlockPool(codec, config.head_dim, spec.block_tokens, n_blocks, device, dtype) if pool is None else pool
    rows = Rows(batch_size, torch.device(device))
    # GEAR's blocks are decoded, then attended; StreamingLLM over int codes rotates its keys at every read
    in_place = codec.exact or not POLICIES[spec.policy].rotates_by_slot  # keys read as stored are read right
    fused = spec.attend == "fused" and codec.kernel_readable and in_place
    kernel = paged_kernel(backend, device, dtype, codec.float32_or_codes(dtype)) if fused else None
    heads = np.arange(batch_size * config.n_kv_head).reshape(batch_size, config.n_kv_head)  # (B, H_kv)
    regions = [None if max_tokens is None else (l * heads.size + heads) * per_head for l in range(config.n_layer)]
    if codec.residual > 0:  # KIVI, GEAR: blocks, and a full-precision residual beside them
        stores = [ResidualPagedStore(pool, rows, config.n_kv_head, dtype, region) for region in regions]
    else:
        stores = [PagedStore(pool, rows, config.n_kv_head, dtype, region) for region in regions]
    layers = [LayerCache(make_policy(spec, config), store, kernel) for store in stores]  # each head: a stretch
    return ModelCache(layers, batch_size, config.n_kv_head, config.head_dim, torch.device(device), rows)


def build_cache(
    spec: CacheSpec, model_config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
    backend: str = "sdpa", max_tokens: int | None = None, pool: BlockPool | None = None,
) -> ModelCache:
    """An empty ModelCache for `batch_size` sequences: one (policy, store) LayerCache per layer.

    Returned K/V are in `dtype` (the model's). `backend` is the model's attention backend (model.backend.name):
    with it, the device and dtype, it picks the kernel that attends over a quantized cache's stored codes
    (cache/kernels/choose.py). `max_tokens`, the most tokens a sequence will hold, sizes a block pool up front;
    `pool` (build_pool) puts the cache's blocks in a pool shared with other caches instead.
    Raises ValueError for an invalid spec (see check_spec).
    """
    check_spec(spec, model_config)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    codec = spec.build_codec(model_config.head_dim)
    if on_blocks(spec, codec):
        return build_paged(spec, codec, model_config, batch_size, device, dtype, backend, max_tokens, pool)
    if pool is not None:
        raise ValueError(f"cache={spec.name} merges layers (MiniCache) in contiguous stores, so it cannot share a "
                         f"block pool")
    return build_merged(spec, codec, model_config, batch_size, device, dtype, backend)


def build_merged(spec: CacheSpec, codec: codecs.Codec, config: ModelConfig, batch_size: int, device: torch.device,
                 dtype: torch.dtype, backend: str) -> ModelCache:
    """MiniCache: layers l - 1 and l from merge_start on see one PairStore through two views (cache/minicache.py),
    the layers before it a contiguous store each. A pair shares one direction per token between two layers, which
    two layers' blocks, allocated and compacted apart, could not."""
    fused = codec.kernel_readable and spec.attend == "fused"  # GEAR's codes: decoded, then attended
    kernel = decode_kernel(backend, device, dtype) if fused else None
    stores = [make_store(codec, dtype) for _ in range(config.n_layer)]
    for l in range(merge_start(spec, config), config.n_layer, 2):
        pair = PairStore(make_store(codec, dtype), spec.merge_t, spec.merge_gamma)
        stores[l - 1], stores[l] = MergedLayerStore(pair, 0), MergedLayerStore(pair, 1)
    layers = [LayerCache(make_policy(spec, config), store, kernel) for store in stores]
    return ModelCache(layers, batch_size, config.n_kv_head, config.head_dim, torch.device(device))
