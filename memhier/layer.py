"""A layer store whose sealed blocks live in a TieredStore, and the builder of a ModelCache made of them.

    cache = make_cache(cache_spec, memhier_spec, model_config, batch_size, device, dtype)   # on or off

Exact mode. Each layer keeps an *open* block in an ordinary CodecStore (the same codec as without memhier, so a
4-bit cache stays 4-bit). When its encoded body reaches `block_tokens` tokens, the first `block_tokens` are cut
off, without decoding, packed into one uint8 blob (K then V: codes, scales, zeros) and put in the TieredStore
under the key (layer, block index). Every step, update() gets every sealed block of its layer back (promoting it
to the device tier), decodes them and the open block, and concatenates them in token order:

    K = [ block 0 | block 1 | ... | open block (encoded body + KIVI's fp residual) | the T new tokens ]

Decoding is elementwise given each group's scale and zero, so decoding block by block and concatenating equals
decoding the whole payload at once: the result is bit-identical to the cache without memhier (tests defend it).

Granularity: a block holds one layer's K and V rather than all layers', so layer i fetches only its own bytes,
and while layer i computes, a background thread fetches layer i + 1's blocks (overlap). Eviction presets are
refused for now: an evicting policy rewrites old tokens, which would mean rewriting sealed blocks.
"""

import tempfile
from dataclasses import dataclass

import torch

from cache.base import LayerCache, ModelCache
from cache.codecs import Codec
from cache.presets import CacheSpec, build_cache, check_spec, make_codec, make_policy
from cache.storage import CodecStore
from memhier.blob import BlockLayout, slice_tokens
from memhier.store import TieredStore
from memhier.tiers import DiskTier, Key, MemoryTier
from toymodel.config import ModelConfig


@dataclass
class MemhierSpec:
    """Where sealed cache blocks live (the `memhier` config group). Budgets are bytes per tier, whole cache.

    enabled:      False builds the plain in-memory cache (memhier=off)
    block_tokens: tokens per block (KIVI: a multiple of the cache's group_size)
    device_bytes: the device tier (on a CPU-only machine an in-memory tier with this budget)
    host_bytes:   host memory (pinned when the cache lives on a GPU)
    disk_bytes:   the spill directory; when it is full, the run stops with an error (nothing is evictable)
    spill_dir:    where this run's spill directory is created (removed at exit); None: the system temp dir
    prefetch:     fetch layer i + 1's blocks on a background thread while layer i computes
    """

    enabled: bool = False
    block_tokens: int = 16
    device_bytes: int = 256 * 1024
    host_bytes: int = 1024 * 1024
    disk_bytes: int = 1024**3
    spill_dir: str | None = None
    prefetch: bool = True


class TieredLayerStore:
    """One layer's tokens: sealed blocks in a shared TieredStore, the open block in a CodecStore."""

    def __init__(self, layer: int, codec: Codec, out_dtype: torch.dtype, store: TieredStore, block_tokens: int):
        self.layer, self.codec, self.store, self.block_tokens = layer, codec, store, block_tokens
        self.open = CodecStore(codec, out_dtype)  # encoded body (< block_tokens after sealing) + KIVI residual
        self.out_dtype = out_dtype
        self.sealed = 0  # blocks handed to the store
        self.layout: BlockLayout | None = None  # recorded from the first sealed block
        self.next: "TieredLayerStore | None" = None  # the layer computed after this one (prefetch target)
        self.prefetch = False

    def __len__(self) -> int:
        return self.sealed * self.block_tokens + len(self.open)

    def keys(self) -> tuple[Key, ...]:
        return tuple((self.layer, i) for i in range(self.sealed))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H_kv, T, D) -> K, V: (B, H_kv, n, D): every sealed block, then the open block, decoded."""
        keys = self.keys()  # the blocks sealed before this step: the ones a prefetch may be fetching
        self.store.wait(keys)
        K_open, V_open = self.open.append(k, v)  # (B, H_kv, n_open, D), decoded before any sealing below
        self._seal()
        blobs = [self.store.get(key) for key in keys]  # promoted to the device tier, where room allows
        if self.prefetch and self.next is not None:
            self.store.prefetch(self.next.keys())  # runs while this layer decodes, attends and runs its MLP
        if not keys:
            return K_open, V_open
        k_ps, v_ps = zip(*(self.layout.unpack(blob) for blob in blobs))  # views of each blob
        K_old = self.codec.key.decode(self.codec.key.cat(k_ps), self.out_dtype)  # (B, H_kv, sealed * bt, D)
        V_old = self.codec.value.decode(self.codec.value.cat(v_ps), self.out_dtype)  # one decode, not one per block
        return torch.cat([K_old, K_open], dim=2), torch.cat([V_old, V_open], dim=2)  # (B, H_kv, n, D)

    def _seal(self) -> None:
        """Cut every whole block off the open body and put it in the store, encoded as it is."""
        n_body = len(self.open) - self.open.k_res.shape[2]
        n_seal = n_body // self.block_tokens * self.block_tokens
        for a in range(0, n_seal, self.block_tokens):
            k_p = slice_tokens(self.open.k_body, a, a + self.block_tokens)  # (B, H_kv, block_tokens, D) encoded
            v_p = slice_tokens(self.open.v_body, a, a + self.block_tokens)
            if self.layout is None:
                self.layout = BlockLayout.of(k_p, v_p)
            self.store.put((self.layer, self.sealed), self.layout.pack(k_p, v_p))
            self.sealed += 1
        if n_seal == n_body:
            self.open.k_body = self.open.v_body = None
        elif n_seal > 0:
            self.open.k_body = slice_tokens(self.open.k_body, n_seal, n_body)  # (B, H_kv, n_body - n_seal, D)
            self.open.v_body = slice_tokens(self.open.v_body, n_seal, n_body)

    def tokens_stored(self) -> int:
        """Tokens summed over batch and KV heads."""
        res = self.open.k_res
        return 0 if res is None else res.shape[0] * res.shape[1] * len(self)

    def padding(self) -> None:
        return None

    def renormalize(self, weights: torch.Tensor) -> torch.Tensor:
        return weights

    def tensors(self) -> list[torch.Tensor]:
        """The open block's tensors (sealed blocks are counted per tier by the TieredStore)."""
        return self.open.tensors()


class TieredModelCache(ModelCache):
    """A ModelCache whose layers keep sealed blocks in `store`; memory_bytes() adds each tier's bytes."""

    def __init__(self, layers: list[LayerCache], store: TieredStore, batch_size: int, n_kv_head: int,
                 head_dim: int, device: torch.device):
        super().__init__(layers, batch_size, n_kv_head, head_dim, device)
        self.store = store

    def memory_bytes(self) -> dict[str, int]:
        """{"device": open blocks + device tier, "host": host tier, "disk": disk tier} in real bytes."""
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
        return {**super().figures(), **flat}

    def close(self) -> None:
        """Stop the prefetch thread and delete the spill directory."""
        self.store.close()


def check_memhier(spec: MemhierSpec, cache_spec: CacheSpec) -> None:
    """Raise a ValueError naming the field and the fix for every combination memhier cannot run."""
    if cache_spec.policy != "full":
        raise ValueError(f"memhier=on keeps every token (exact mode), but cache={cache_spec.name} evicts "
                         f"(policy={cache_spec.policy}); use a keep-everything preset (full, quant8, quant4, kivi4, "
                         f"kivi2) with memhier=on, or memhier=off with eviction")
    if spec.block_tokens < 1:
        raise ValueError(f"memhier.block_tokens={spec.block_tokens} must be at least 1 (e.g. 16)")
    for name in ("device_bytes", "host_bytes", "disk_bytes"):
        if getattr(spec, name) < 0:
            raise ValueError(f"memhier.{name}={getattr(spec, name)} must be >= 0 (0: the tier is not used)")
    residual = make_codec(cache_spec).residual
    if residual and spec.block_tokens % cache_spec.group_size:
        raise ValueError(f"memhier.block_tokens={spec.block_tokens} must be a multiple of cache.group_size="
                         f"{cache_spec.group_size} with codec={cache_spec.codec}: KIVI's key groups span "
                         f"{cache_spec.group_size} tokens and cannot be cut across blocks")


def build_tiered_cache(cache_spec: CacheSpec, spec: MemhierSpec, model_config: ModelConfig, batch_size: int,
                       device: torch.device, dtype: torch.dtype) -> TieredModelCache:
    """An empty TieredModelCache: one TieredLayerStore per layer over one shared device/host/disk TieredStore."""
    check_spec(cache_spec, model_config)
    check_memhier(spec, cache_spec)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    store = TieredStore([
        MemoryTier("device", spec.device_bytes, device),
        MemoryTier("host", spec.host_bytes, torch.device("cpu"), pin=on_gpu),
        DiskTier(spec.disk_bytes, spec.spill_dir or tempfile.gettempdir()),
    ])
    codec = make_codec(cache_spec)
    stores = [TieredLayerStore(i, codec, dtype, store, spec.block_tokens) for i in range(model_config.n_layer)]
    for i, layer_store in enumerate(stores):
        layer_store.next = stores[(i + 1) % len(stores)]  # after the last layer: layer 0 of the next step
        layer_store.prefetch = spec.prefetch
    layers = [LayerCache(make_policy(cache_spec, model_config), s) for s in stores]
    return TieredModelCache(layers, store, batch_size, model_config.n_kv_head, model_config.head_dim, device)


def make_cache(cache_spec: CacheSpec, spec: MemhierSpec, model_config: ModelConfig, batch_size: int,
               device: torch.device, dtype: torch.dtype) -> ModelCache:
    """The plain cache (memhier off) or the tiered one (memhier on), for the same cache preset."""
    if not spec.enabled:
        return build_cache(cache_spec, model_config, batch_size, device, dtype)
    return build_tiered_cache(cache_spec, spec, model_config, batch_size, device, dtype)
