"""Retrieval mode: with room for every block it is exact mode, bit for bit; with a small top-k each decode step
fetches only the sink, local and top-k blocks; the choice follows the query; no query, a clear error."""

import dataclasses

import pytest
import torch

from cache.presets import PRESETS
from memhier.cache import MemhierSpec, build_tiered_cache
from memhier.retrieval import Retriever
from toymodel.config import ModelConfig
from toymodel.model import Transformer

CPU = torch.device("cpu")
PRESET = dataclasses.replace(PRESETS["quant4"], group_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def spec(tmp_path, mode: str, topk: int) -> MemhierSpec:
    return MemhierSpec(enabled=True, block_tokens=8, device_bytes=1500, host_bytes=1500, spill_dir=str(tmp_path),
                       mode=mode, topk_blocks=topk, sink_blocks=1, local_blocks=1, rep_keys=2)


def logits_through(model, cache, idx: torch.Tensor) -> torch.Tensor:
    """A 9-token prefill, then one token at a time -> logits (B, T, vocab)."""
    with torch.no_grad():
        out = [model(idx[:, :9], cache)] + [model(idx[:, t : t + 1], cache) for t in range(9, idx.shape[1])]
    return torch.cat(out, dim=1)


def test_retrieval_with_room_for_every_block_equals_exact(tmp_path):
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64)
    torch.manual_seed(0)
    # the reference backend decodes the cache, then attends, in exact mode too (sdpa would read exact mode's codes
    # with the C decode kernel, whose sums run in another order): the same arithmetic, so the same bits
    model, idx = Transformer(config, backend="reference").eval(), torch.randint(0, 97, (2, 56))
    exact = build_tiered_cache(PRESET, spec(tmp_path, "exact", 0), config, 2, CPU, torch.float32,
                               backend="reference")
    retrieval = build_tiered_cache(PRESET, spec(tmp_path, "retrieval", 64), config, 2, CPU, torch.float32,
                                   backend="reference")
    assert torch.equal(logits_through(model, retrieval, idx), logits_through(model, exact, idx))
    assert retrieval.store.stats()["blocks"]["disk"] > 0  # the blocks really went through the tiers
    exact.close(), retrieval.close()


def test_small_topk_fetches_only_the_chosen_blocks(tmp_path):
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=1, d_model=32, block_size=64)  # MQA
    torch.manual_seed(0)
    model, idx = Transformer(config).eval(), torch.randint(0, 97, (1, 80))
    cache = build_tiered_cache(PRESET, spec(tmp_path, "retrieval", 2), config, 1, CPU, torch.float32)
    logits_through(model, cache, idx[:, :72])  # 9 sealed blocks per layer
    fetched, real_get = [], cache.store.get
    cache.store.get = lambda key: (fetched.append(key), real_get(key))[1]
    lengths = []
    real_append = cache.layers[0].store.append
    cache.layers[0].store.append = lambda k, v, q: (lambda K, V: (lengths.append(K.shape[2]), (K, V))[1])(
        *real_append(k, v, q))
    with torch.no_grad():
        for t in (72, 73):  # two decode steps
            model(idx[:, t : t + 1], cache)
    per_layer_step = 1 + 1 + 2  # sink + local + top-k
    assert len(fetched) == 2 * 2 * per_layer_step  # 2 steps x 2 layers, never the other 5 blocks
    assert lengths == [per_layer_step * 8 + 1, per_layer_step * 8 + 2]  # chosen blocks + the open block's tokens
    assert {key[1] for key in fetched} >= {0, 8}  # the sink block and the most recent sealed block
    cache.close()


def test_choice_follows_the_query():
    r = Retriever(topk_blocks=1, sink_blocks=0, local_blocks=0, rep_keys=1)
    for i in range(6):
        keys = torch.zeros(1, 2, 4, 8)  # (B, H_kv, bt, D)
        keys[0, 0, 1, i] = 1.0  # KV head 0's block i points along channel i
        keys[0, 1, 2, 5 - i] = 1.0  # KV head 1's block i along channel 5 - i
        r.add(keys)
    q = torch.zeros(1, 4, 1, 8)  # (B, H, 1, D): 2 query heads per KV head
    q[0, 0, 0, 4] = q[0, 1, 0, 4] = 1.0  # KV head 0's group looks along channel 4
    q[0, 2, 0, 1] = 1.0  # KV head 1's group along channel 1
    assert r.choose(6, q).tolist() == [[[4], [4]]]  # each KV head its own block (head 1: 5 - 4 = 1 -> block 4)


def test_a_decode_step_without_its_query_is_refused(tmp_path):
    config = ModelConfig(vocab_size=97, n_layer=1, n_head=2, n_kv_head=1, d_model=16, block_size=64)
    model = Transformer(config).eval()
    cache = build_tiered_cache(PRESET, spec(tmp_path, "retrieval", 1), config, 1, CPU, torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, 40, dtype=torch.long), cache)
        k = v = torch.zeros(1, 1, 1, 8)  # (B, H_kv, T, D): one decode step's new key and value
        with pytest.raises(ValueError, match=r"needs each step's queries"):
            cache.layers[0].store.append(k, v)  # no queries: the retriever cannot choose
    cache.close()
