"""KV-Compress in the serving engine (serving/kvcompress.py): per-request budgets met in whole blocks, the protected
window never evicted, each request's output alone in any batch, the masking counterfactual, and compressing again
while decoding: the budget at every step, the same tokens in any batch, in one call as op by op."""

import itertools
from dataclasses import replace

import pytest
import torch

from cache.presets import PRESETS, build_cache
from serving.engine import Engine
from serving.kvcompress import compress
from serving.sequence import Request
from engine_checks import all_free, alone, model, requests  # tests/engine_checks.py

CPU = torch.device("cpu")


def compressed(request: Request, budget: int, window: int = 4) -> Request:
    return replace(request, max_cache_tokens=budget, protected_window_size=window)


def test_a_budget_at_least_the_prompt_changes_nothing():
    m = model()
    reqs = requests(5, seed=13)
    engine = Engine(m, n_blocks=200)
    done = engine.generate([compressed(r, len(r.prompt)) for r in reqs])
    assert [c.tokens for c in done] == [alone(m, r) for r in reqs] and engine.stats.blocks_evicted == 0


def test_kv_compress_meets_the_budget_in_whole_blocks_and_never_evicts_the_protected_window():
    """Blocks of 2 tokens, a budget of 6 tokens per (layer, KV head) on average: after prefill the row holds at
    most 2 layers x 2 KV heads x 3 blocks, its heads differ in length, and every head's last 2 tokens are kept."""
    m = model()
    spec = replace(PRESETS["full"], block_tokens=2)
    prompt = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = Engine(m, spec, n_blocks=100)
    engine.add(Request(prompt, max_tokens=5, max_cache_tokens=6, protected_window_size=2))
    engine.step()  # the prefill, and the compression
    stores = [layer.store for layer in engine.cache.layers]
    assert sum(s.blocks_held() for s in stores) <= 2 * 2 * 3 == engine.pool.blocks_in_use()
    assert len({int(n) for s in stores for n in s.lengths.flatten()}) > 1  # rates differ per head and layer
    full = build_cache(spec, m.config, 1, CPU, torch.float32)
    with torch.no_grad():
        m(torch.tensor([prompt]), full)
    for kept, whole in zip(stores, full.layers):
        K, W = kept.read(values=False)[0], whole.store.read(values=False)[0]  # (1, H_kv, n, D)
        for h, n in enumerate(kept.lengths[0].tolist()):
            torch.testing.assert_close(K[0, h, n - 2 : n], W[0, h, -2:], rtol=0, atol=0)  # the window, as stored
    while engine.has_work():
        engine.step()
    assert all_free(engine) and engine.stats.blocks_evicted > 0


@pytest.mark.parametrize("reserve", [False, True], ids=["optimistic", "reserve"])
def test_compressed_requests_get_their_output_alone_in_any_batch(reserve):
    """Reserving each sequence's growth, the engine never preempts, not even in a tiny pool."""
    m = model()
    reqs = [compressed(r, 8) if i % 2 else r for i, r in enumerate(requests(8, seed=17))]
    alone_in_engine = [Engine(m, n_blocks=200).generate([r])[0].tokens for r in reqs]
    for n_blocks, max_batch in ((200, 8), (24, 8), (200, 2)):  # together; a tiny pool; few rows
        engine = Engine(m, n_blocks=n_blocks, max_batch=max_batch, reserve=reserve)
        assert [c.tokens for c in engine.generate(reqs)] == alone_in_engine
        assert all_free(engine)
        if reserve:
            assert engine.stats.preemptions == 0


def test_the_masking_counterfactual_evicts_the_same_tokens_but_holds_the_freed_blocks():
    """free_evicted=False: the same outputs as freeing (the same tokens evicted), the pool as full as the full
    cache's after the prefill, and every block back when the workload ends, preemptions included."""
    m = model()
    reqs = [compressed(r, 8) for r in requests(8, seed=19)]
    freeing = Engine(m, n_blocks=200)
    expected = [c.tokens for c in freeing.generate(reqs)]
    for n_blocks in (200, 40):  # roomy; tiny (preemptions)
        masking = Engine(m, n_blocks=n_blocks, free_evicted=False)
        assert [c.tokens for c in masking.generate(reqs)] == expected
        assert all_free(masking) and masking.stats.blocks_evicted > 0
    longest = max(reqs, key=lambda r: len(r.prompt))
    one = Engine(m, n_blocks=200, free_evicted=False)
    one.add(longest)
    one.step()  # the prefill and the compression: held as if nothing were evicted
    assert one.stats.blocks_evicted > 0
    assert one.pool.blocks_in_use() == one.scheduler.blocks_for(len(longest.prompt))
    assert one.scheduler.running[0].held_blocks == one.pool.blocks_in_use()


def test_compressing_while_decoding_keeps_the_budget_and_the_window_at_every_step():
    """compress_once=False, blocks of 2 tokens, a budget of 4 tokens per (layer, KV head): after every step the
    row holds fewer than its budget's blocks plus one per head, each head's last 3 tokens are stored (layer 0's
    keys, which depend on the tokens alone, equal a full cache's), and it evicts again and again."""
    m = model()
    spec = replace(PRESETS["full"], block_tokens=2)
    prompt = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = Engine(m, spec, n_blocks=100)
    engine.add(Request(prompt, max_tokens=24, max_cache_tokens=4, protected_window_size=3, compress_once=False))
    evictions = []
    while engine.has_work():
        engine.step()
        if not engine.scheduler.running:
            break
        seq, stores = engine.scheduler.running[0], [layer.store for layer in engine.cache.layers]
        assert sum(s.blocks_held() for s in stores) < 2 * 2 * (2 + 1)
        full = build_cache(spec, m.config, 1, CPU, torch.float32)
        with torch.no_grad():
            m(torch.tensor([seq.tokens[:-1]]), full)  # what the engine has stored: all but the last sampled
        K, W = stores[0].read(values=False)[0], full.layers[0].store.read(values=False)[0]  # (1, H_kv, n, D)
        for h, n in enumerate(stores[0].lengths[0].tolist()):
            torch.testing.assert_close(K[0, h, n - 3 : n], W[0, h, -3:], rtol=0, atol=1e-6)  # decode vs prefill
        evictions.append(engine.stats.blocks_evicted)
    assert len(set(evictions)) > 3  # compressed after the prefill and again while decoding
    assert all_free(engine)


def test_a_window_above_the_budget_does_not_make_it_compress_at_every_step(monkeypatch):
    """Budget 2 tokens, protected window 6, blocks of 2: the window keeps 3 blocks per head, above the budget's 1,
    so the sequence compresses again only when it has grown a block per head past what it kept: once per 2
    steps, not at every one."""
    m, spec = model(), replace(PRESETS["full"], block_tokens=2)
    calls = []
    original = Engine._compress
    monkeypatch.setattr(Engine, "_compress", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    engine = Engine(m, spec, n_blocks=200)
    prompt = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(6)).tolist()
    engine.generate([Request(prompt, max_tokens=21, max_cache_tokens=2, protected_window_size=6,
                             compress_once=False)])
    assert 1 + 20 // 2 - 1 <= len(calls) <= 1 + 20 // 2  # after the prefill, then every other decode step


def test_compressing_while_decoding_keeps_the_same_tokens_in_any_batch_as_alone():
    """Blocks of 2 tokens: requests compressing while they decode do so every other step or so, each from its own
    row's scores, beside requests compressed once."""
    m, spec = model(), replace(PRESETS["full"], block_tokens=2)
    reqs = [replace(compressed(r, 8), compress_once=i % 3 == 0) for i, r in enumerate(requests(9, seed=23))]
    alone_in_engine: dict = {}
    for i, r in enumerate(reqs):
        alone_in_engine.update(kept_at_every_step(Engine(m, spec, n_blocks=800), [r], first=i))
    for max_batch in (9, 4):
        engine = Engine(m, spec, n_blocks=800, max_batch=max_batch)
        together = kept_at_every_step(engine, reqs)
        assert together.keys() == alone_in_engine.keys()
        for key, (lengths, sums) in together.items():
            assert lengths == alone_in_engine[key][0], key
            torch.testing.assert_close(sums, alone_in_engine[key][1], rtol=1e-5, atol=1e-5)
        assert all_free(engine)


def test_compressing_while_decoding_keeps_the_same_tokens_in_one_call_as_op_by_op():
    """The decode block in one C call hands its softmax weights to the running scores as the operations do: the
    same kept keys after every step; a one-token prompt's prefill is such a step."""
    m, spec = model(), replace(PRESETS["full"], block_tokens=2)
    reqs = [replace(compressed(r, 8), compress_once=False) for r in requests(6, seed=29)]
    reqs.append(Request([5], max_tokens=20, max_cache_tokens=4, protected_window_size=2, compress_once=False))
    kept = []
    for one_call in (True, False):
        for block in m.layers:
            block.one_call = one_call
        kept.append(kept_at_every_step(Engine(m, spec, n_blocks=800), reqs))
    assert kept[0].keys() == kept[1].keys()
    for key, (lengths, sums) in kept[0].items():
        assert lengths == kept[1][key][0], key
        torch.testing.assert_close(sums, kept[1][key][1], rtol=1e-5, atol=1e-5)


def kept_at_every_step(engine: Engine, reqs: list[Request], first: int = 0) -> dict:
    """What each request's row holds after every step: {(request index, tokens out): (its heads' lengths per
    layer, its heads' key sums (n_layer, H_kv))}. The kept keys say which tokens the evictions chose (the tiny
    random model's greedy tokens barely depend on them)."""
    ids = [engine.add(r) for r in reqs]
    seen = {}
    while engine.has_work():
        engine.step()
        for row, seq in enumerate(engine.scheduler.running):
            stores = [layer.store for layer in engine.cache.layers]
            lengths = [s.lengths[row].tolist() for s in stores]
            sums = torch.stack([torch.stack([s.read(values=False)[0][row, h, :n].sum() for h, n in enumerate(ns)])
                                for s, ns in zip(stores, lengths)])  # (n_layer, H_kv)
            seen[(first + ids.index(seq.id), len(seq.output))] = (lengths, sums)
    return seen


def test_compress_evicts_the_lowest_groups_of_each_row_as_a_plain_reading_of_the_rule():
    """`compress` on three ragged rows at once against the rule read plainly, row by row: each head's keys outside
    its window sorted by score (ties: the earlier slot), cut into groups of block_tokens, and the row's lowest
    groups across layers and heads (ties: layer-major head, then group) evicted until it meets its budget. Scores
    are small integers, so that ties abound and every sum is exact; one row has nothing to evict."""
    m, spec, bt = model(), replace(PRESETS["full"], block_tokens=2), 2
    prompts, budgets, windows = (30, 23, 8), (6, 3, 8), (2, 5, 1)
    cache = build_cache(spec, m.config, 3, CPU, torch.float32)
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        m(torch.randint(0, 97, (3, 30), generator=g), cache, lengths=torch.tensor(prompts))
    stores = [layer.store for layer in cache.layers]
    keys = [s.read(values=False)[0] for s in stores]  # (3, H_kv, 30, D) per layer, before
    scores = [torch.randint(0, 2, (3, 2, 30), generator=g).float() for _ in stores]  # (rows, H_kv, L) per layer
    freed, kept = compress(cache, scores, list(budgets), list(windows), [0, 1, 2])
    for row, (T, budget, window) in enumerate(zip(prompts, budgets, windows)):
        groups = []  # (sum, head, group, slots), head = layer * H_kv + h
        for l, h in itertools.product(range(2), range(2)):
            s = scores[l][row, h].tolist()
            order = sorted(range(max(T - window, 0)), key=lambda i: (s[i], i))
            groups += [(sum(s[i] for i in order[j : j + bt]), 2 * l + h, j, order[j : j + bt])
                       for j in range(0, len(order) - len(order) % bt, bt)]
        over = 2 * 2 * -(-T // bt) - 2 * 2 * -(-budget // bt)
        gone = sorted(groups)[: max(over, 0)]
        assert freed[row] == len(gone)
        for l, h in itertools.product(range(2), range(2)):
            evicted = {i for _, head, _, slots in gone if head == 2 * l + h for i in slots}
            left = [i for i in range(T) if i not in evicted]
            n = int(stores[l].lengths[row, h])
            assert n == len(left), (row, l, h)
            assert torch.equal(stores[l].read(values=False)[0][row, h, :n], keys[l][row, h, left])
            assert kept[l][row, h, :n].tolist() == [scores[l][row, h, i].item() for i in left]
            assert not kept[l][row, h, n:].any()
    assert freed[2] == 0 and freed[0] > 0 and freed[1] > 0  # 8 tokens, a budget of 8: nothing over
