"""What the serving tests share (tests/serving/): a tiny random model packed for decoding, and the leak check."""

import torch

from serving.engine import Engine
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
