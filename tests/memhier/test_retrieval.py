"""Retrieval mode on the pool's blocks: with room for every block it is memhier=off, bit for bit; a decode step
reads exactly the sink, local and top-k blocks its query scores best (against a direct reference), each row and
KV head its own, and the tiers bring in only those; no query, a clear error."""

import dataclasses

import pytest
import torch

from cache.blocks import PagedStore
from cache.model_cache import Rows
from cache.pool import BlockPool
from cache.presets import PRESETS, build_cache
from memhier.cache import MemhierSpec, build_tiered_cache
from memhier.retrieval import Retriever
from toymodel.config import ModelConfig
from toymodel.model import Transformer

CPU = torch.device("cpu")
PRESET = dataclasses.replace(PRESETS["quant4"], group_size=8, block_tokens=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def spec(tmp_path, mode: str, topk: int, group_bytes: int = 32 * 1024) -> MemhierSpec:
    return MemhierSpec(enabled=True, group_bytes=group_bytes, device_bytes=1500, host_bytes=1500,
                       spill_dir=str(tmp_path), mode=mode, topk_blocks=topk, sink_blocks=1, local_blocks=1,
                       rep_keys=2)


def logits_through(model, cache, idx: torch.Tensor) -> torch.Tensor:
    """A 9-token prefill, then one token at a time -> logits (B, T, vocab)."""
    with torch.no_grad():
        out = [model(idx[:, :9], cache)] + [model(idx[:, t : t + 1], cache) for t in range(9, idx.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["quant4", "kivi2"])
def test_retrieval_with_room_for_every_block_equals_memhier_off(tmp_path, name):
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64)
    torch.manual_seed(0)
    model, idx = Transformer(config).eval(), torch.randint(0, 97, (2, 56))
    preset = dataclasses.replace(PRESETS[name], group_size=8, residual=16, block_tokens=8)
    off = build_cache(preset, config, 2, CPU, torch.float32)
    retrieval = build_tiered_cache(preset, spec(tmp_path, "retrieval", 64), config, 2, CPU, torch.float32)
    assert torch.equal(logits_through(model, retrieval, idx), logits_through(model, off, idx))
    assert retrieval.store.stats()["blocks"]["disk"] > 0  # the blocks really went through the tiers
    retrieval.close()


def reference_choice(k: torch.Tensor, q: torch.Tensor, n_full: int, bt: int, r: int, sink: int, local: int,
                     topk: int) -> list[int]:
    """One KV head's blocks, the simple way: k (n, D) its keys, q (G, D) its group's queries."""
    if n_full <= sink + local + topk:
        return list(range(n_full))
    scores = []
    for j in range(n_full):
        block = k[j * bt : (j + 1) * bt]
        reps = block[block.norm(dim=-1).topk(r).indices]  # (r, D): the longest keys
        scores.append(float((reps @ q.sum(dim=0)).max()))
    always = set(range(sink)) | set(range(n_full - local, n_full))
    rest = sorted((j for j in range(n_full) if j not in always), key=lambda j: -scores[j])
    return sorted(always | set(rest[:topk]))


def test_a_decode_step_reads_the_blocks_a_direct_reference_chooses():
    """Rows of 30 and 13 tokens (blocks of 4), 2 KV heads of 2 query heads each: the long row's heads choose their
    own 4 of 7 full blocks, the short row reads its 3 all; then the open block and the step's token."""
    torch.manual_seed(0)
    bt, D, lengths = 4, 8, [30, 13]
    pool = BlockPool(PRESETS["full"].build_codec(D), D, bt, 64, CPU, torch.float32)
    rows = Rows(2, CPU)
    store = PagedStore(pool, rows, 2, torch.float32)
    store.chooser = Retriever(topk_blocks=2, sink_blocks=1, local_blocks=1, rep_keys=2)
    k, v = torch.randn(2, 2, 30, D), torch.randn(2, 2, 30, D)  # (B, H_kv, T, D), row 1 right-padded
    rows.new[:] = torch.tensor(lengths)
    store.add(k, v)
    q, k1, v1 = torch.randn(2, 4, 1, D), torch.randn(2, 2, 1, D), torch.randn(2, 2, 1, D)
    rows.new[:] = 1
    store.add(k1, v1, q)
    K, V = store.read()
    for b, n in enumerate(lengths):
        for h in range(2):
            chosen = reference_choice(k[b, h, :n], q[b, 2 * h : 2 * h + 2, 0], n // bt, bt, 2, 1, 1, 2)
            slots = [j * bt + i for j in chosen for i in range(bt)] + list(range(n // bt * bt, n))
            want_k = torch.cat([k[b, h, slots], k1[b, h]])  # (m, D): the chosen blocks, the open one, the new key
            want_v = torch.cat([v[b, h, slots], v1[b, h]])
            assert int(store.kernel_args()[3][b, h]) == len(want_k)
            assert torch.equal(K[b, h, : len(want_k)], want_k) and torch.equal(V[b, h, : len(want_v)], want_v)
    assert len({tuple(c) for c in store.view[0][0].tolist()}) == 2  # the long row's heads chose differently


def test_small_topk_brings_in_only_the_chosen_blocks(tmp_path):
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=1, d_model=32, block_size=128)  # MQA
    torch.manual_seed(0)
    model, idx = Transformer(config).eval(), torch.randint(0, 97, (1, 80))
    cache = build_tiered_cache(PRESET, spec(tmp_path, "retrieval", 2, group_bytes=1), config, 1, CPU,
                               torch.float32)  # a group per block
    logits_through(model, cache, idx[:, :72])  # 9 full blocks per layer
    pool, opened, lengths = cache.layers[0].store.pool, [], []
    real_open = pool.open
    pool.open = lambda store, ids=None: (opened.append(ids), real_open(store, ids))[1]
    with torch.no_grad():
        for t in (72, 73):  # two decode steps
            model(idx[:, t : t + 1], cache)
            lengths.append(int(cache.layers[0].store.kernel_args()[3]))
    per_step = 1 + 1 + 2  # sink + local + top-k
    assert [len(ids) for ids in opened] == [per_step, per_step, per_step + 1, per_step + 1]  # + the open block
    assert lengths == [per_step * 8 + 1, per_step * 8 + 2]  # chosen blocks + the open block's tokens
    tables = cache.layers[0].store.tables[0, 0]
    assert {int(tables[0]), int(tables[8])} <= set(opened[2].tolist())  # the sink block and the latest full one
    cache.close()


def test_a_decode_step_without_its_query_is_refused(tmp_path):
    config = ModelConfig(vocab_size=97, n_layer=1, n_head=2, n_kv_head=1, d_model=16, block_size=64)
    model = Transformer(config).eval()
    cache = build_tiered_cache(PRESET, spec(tmp_path, "retrieval", 1), config, 1, CPU, torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, 40, dtype=torch.long), cache)
        k = v = torch.zeros(1, 1, 1, 8)  # (B, H_kv, T, D): one decode step's new key and value
        with pytest.raises(ValueError, match=r"need each decode step's queries"):
            cache.layers[0].store.add(k, v)  # no queries: the retriever cannot choose
    cache.close()
