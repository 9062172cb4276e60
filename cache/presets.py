"""Cache presets: a plain CacheSpec names a policy and a codec; `build_cache` turns it into a ModelCache.

This is the only place that knows names. It checks every combination up front and raises a ValueError saying
what is wrong and how to fix it, so a bad `infer.py cache=...` fails before the model runs. conf/cache/*.yaml
holds one file per entry of PRESETS, with the same fields.

    spec = PRESETS["sink_int4"]         # or dataclasses.replace(PRESETS["h2o"], budget=64), or CacheSpec(...)
    cache = build_cache(spec, model_config, batch_size=1, device=torch.device("cpu"), dtype=torch.float32)
    logits = model(ids, cache); cache.memory_bytes(); cache.figures()
"""

import re
from dataclasses import dataclass

import torch

from cache import codecs, quant
from cache.base import LayerCache, ModelCache, Policy, Store
from cache.policies import POLICIES, Sink, SnapKV
from cache.storage import BufferStore, CodecStore, RaggedStore
from toymodel.config import ModelConfig


@dataclass
class CacheSpec:
    """One cache configuration. Sizes count tokens per KV head, per layer.

    name:       the preset's name (reports and run names use it)
    policy:     one of POLICIES: full, window, sink, h2o, snapkv, l2norm, kvcompress
    budget:     tokens kept per KV head (kvcompress: on average; the layer keeps budget * n_kv_head); full: unused
    sink:       the first tokens always kept (attention sinks)
    window:     the most recent tokens always kept; snapkv/kvcompress: also the observation window
    codec:      fp, fp16, int8, int4, int2, kivi4, kivi2 (int<bits> / kivi<bits>, bits in 2, 4, 8)
    group_size: elements sharing a scale and zero: channels (int, KIVI values) or tokens (KIVI keys)
    residual:   KIVI's recent tokens kept in full precision, a multiple of group_size
    kernel:     snapkv/kvcompress: width of the max-pool along keys (odd)
    """

    name: str = "full"
    policy: str = "full"
    budget: int = 0
    sink: int = 4
    window: int = 64
    codec: str = "fp"
    group_size: int = 32
    residual: int = 128
    kernel: int = 5


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
    "kivi4": CacheSpec(name="kivi4", codec="kivi4"),
    "kivi2": CacheSpec(name="kivi2", codec="kivi2"),
    "sink_int4": CacheSpec(name="sink_int4", policy="sink", budget=128, sink=4, window=0, codec="int4"),
}

CODEC_NAMES = ("fp", "fp16", "int8", "int4", "int2", "kivi8", "kivi4", "kivi2")


def make_codec(spec: CacheSpec) -> codecs.Codec:
    """The codec named by spec.codec. An adapter over cache.codecs: "int<bits>" and "kivi<bits>" for any supported
    bits (codecs.CODECS lists only the common ones), so an unsupported bit width gets quant's message."""
    if spec.codec in ("fp", "fp16"):
        return codecs.make_codec(spec.codec)
    match = re.fullmatch(r"(int|kivi)(\d+)", spec.codec)
    if match is None:
        raise ValueError(f"unknown codec {spec.codec!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    kind, bits = match.group(1), int(match.group(2))
    quant.check_bits(bits)
    if kind == "int":
        return codecs.int_quant(bits, spec.group_size)
    return codecs.kivi(bits, spec.group_size, spec.residual)


def check_spec(spec: CacheSpec, config: ModelConfig) -> None:
    """Raise a ValueError naming the bad field and the fix for every combination the cache cannot run."""
    if spec.policy not in POLICIES:
        raise ValueError(f"unknown cache policy {spec.policy!r}; valid policies: {', '.join(POLICIES)}")
    codec = make_codec(spec)  # raises for unknown codecs, bits, a KIVI residual that is not a multiple of G
    quantized = spec.codec not in ("fp", "fp16")
    if quantized and config.head_dim % spec.group_size != 0:
        raise ValueError(
            f"cache.group_size={spec.group_size} does not divide head_dim={config.head_dim}; "
            f"choose a divisor of {config.head_dim} (e.g. {config.head_dim})"
        )
    for name in ("budget", "sink", "window"):
        if getattr(spec, name) < 0:
            raise ValueError(f"cache.{name}={getattr(spec, name)} must be >= 0")
    if spec.policy == "full":
        return
    if spec.budget < 1 or spec.budget < spec.sink + spec.window:
        raise ValueError(
            f"cache.budget={spec.budget} must be at least 1 and at least sink + window = {spec.sink} + {spec.window}"
            f" (the tokens every head always keeps); raise the budget or lower sink/window"
        )
    if codec.residual > 0:
        raise ValueError(
            f"cache.codec={spec.codec} cannot be combined with eviction (policy={spec.policy}): KIVI quantizes keys "
            f"per channel in groups of {spec.group_size} tokens, so single tokens cannot be dropped; use int8/int4 "
            f"with eviction, or policy=full with KIVI"
        )
    if spec.policy == "sink" and spec.sink < 1:
        raise ValueError("cache.sink=0 with policy=sink keeps no attention sinks; set cache.sink >= 1 (e.g. 4)")
    if spec.policy in ("snapkv", "kvcompress"):
        if spec.window < 1:
            raise ValueError(f"policy={spec.policy} needs cache.window >= 1: the window is its observation window")
        if spec.kernel < 1 or spec.kernel % 2 == 0:
            raise ValueError(f"cache.kernel={spec.kernel} must be a positive odd number (e.g. 5)")


def make_policy(spec: CacheSpec, config: ModelConfig) -> Policy:
    """A fresh policy for one layer (policies hold per-layer state)."""
    cls = POLICIES[spec.policy]
    if issubclass(cls, Sink):
        return cls(spec.budget, spec.sink, spec.window, rope_theta=config.rope_theta)
    if issubclass(cls, SnapKV):
        return cls(spec.budget, spec.sink, spec.window, kernel=spec.kernel)
    return cls(spec.budget, spec.sink, spec.window)


def make_store(codec: codecs.Codec, policy: Policy, dtype: torch.dtype) -> Store:
    """Ragged policies get a RaggedStore; full precision a preallocated buffer; anything encoded a CodecStore."""
    if policy.ragged:
        return RaggedStore(codec, dtype)
    if codec.full_precision:
        return BufferStore(codec.key.dtype, dtype)
    return CodecStore(codec, dtype)


def build_cache(
    spec: CacheSpec, model_config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype
) -> ModelCache:
    """An empty ModelCache for `batch_size` sequences: one (policy, store) LayerCache per layer.

    Returned K/V are in `dtype` (the model's). Raises ValueError for an invalid spec (see check_spec).
    """
    check_spec(spec, model_config)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    codec = make_codec(spec)
    layers = []
    for _ in range(model_config.n_layer):
        policy = make_policy(spec, model_config)
        layers.append(LayerCache(policy, make_store(codec, policy, dtype)))
    return ModelCache(layers, batch_size, model_config.n_kv_head, model_config.head_dim, torch.device(device))

