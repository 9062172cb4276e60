"""What the serving tests share (tests/serving/): a tiny random model packed for decoding, random requests, a
request's output alone, and the leak check."""

import torch

from cache.presets import PRESETS, CacheSpec, build_cache
from serving.engine import Engine
from serving.generate import Sampling, generate
from serving.sequence import Request
from toymodel.config import ModelConfig
from toymodel.decode_layout import pack_for_decode
from toymodel.model import Transformer


def model(n_kv_head: int = 2) -> Transformer:
    """vocab 97, 2 layers, 4 query heads, head_dim 8, a 256-token context; seeded."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, d_ff=64,
                         block_size=256)
    return pack_for_decode(Transformer(config).eval())


def all_free(engine: Engine) -> bool:
    """Every block back in the pool once the prefix cache lets go of what it keeps: nothing leaked."""
    if engine.prefix is not None:
        engine.prefix.reclaim(engine.pool.n_blocks)
    return engine.pool.n_free == engine.pool.n_blocks and (engine.prefix is None or not engine.prefix.entries)


def requests(n: int, seed: int, sampling: Sampling | None = None) -> list[Request]:
    """n requests with prompts of 1-40 tokens asking for 1-30 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths, wanted = torch.randint(1, 41, (n,), generator=g), torch.randint(1, 31, (n,), generator=g)
    return [Request(prompt=torch.randint(0, 97, (int(T),), generator=g).tolist(), max_tokens=int(k),
                    sampling=sampling or Sampling(temperature=0.0)) for T, k in zip(lengths, wanted)]


def alone(m: Transformer, request: Request, spec: CacheSpec = PRESETS["full"]) -> list[int]:
    """The request through serving.generate, in a batch of one (what infer.py does)."""
    cache = build_cache(spec, m.config, 1, torch.device("cpu"), torch.float32,
                        max_tokens=len(request.prompt) + request.max_tokens)
    out = generate(m, torch.tensor([request.prompt]), cache, request.max_tokens, request.sampling)
    return out.tokens[0].tolist()
