"""The serving engine (serving/engine.py): a request's output in a changing batch equals its output alone through
serving.generate (greedy tokens identical, and a seeded sampler's too), preemptions included; no block leaks; stop
conditions; requests it cannot serve are refused with a message naming the field."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from cache.presets import PRESETS, CacheSpec, build_cache
from serving.engine import Engine
from serving.generate import Sampling, generate
from serving.scheduler import Scheduler
from serving.sequence import Request, Sequence, Status
from engine_checks import all_free, model  # tests/engine_checks.py
from toymodel.model import Transformer

CPU = torch.device("cpu")
QUANT4 = replace(PRESETS["quant4"], group_size=8)  # head_dim 8 here


def requests(n: int, seed: int, sampling: Sampling | None = None) -> list[Request]:
    """n requests with prompts of 1-40 tokens asking for 1-30 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths, wanted = torch.randint(1, 41, (n,), generator=g), torch.randint(1, 31, (n,), generator=g)
    return [Request(prompt=torch.randint(0, 97, (int(T),), generator=g).tolist(), max_tokens=int(k),
                    sampling=sampling or Sampling(temperature=0.0)) for T, k in zip(lengths, wanted)]


def alone(m: Transformer, request: Request, spec: CacheSpec = PRESETS["full"]) -> list[int]:
    """The request through serving.generate, in a batch of one (what infer.py does)."""
    cache = build_cache(spec, m.config, 1, CPU, torch.float32,
                        max_tokens=len(request.prompt) + request.max_tokens)
    out = generate(m, torch.tensor([request.prompt]), cache, request.max_tokens, request.sampling)
    return out.tokens[0].tolist()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("per_head, max_batch", [(500, 16), (500, 3), (12, 8)], ids=["roomy", "few-rows", "tiny"])
def test_each_request_gets_its_output_alone_in_any_batch(n_kv_head, per_head, max_batch):
    """Roomy: everyone at once; few rows: sequences leave and join as others finish; a tiny pool (12 blocks per
    KV head, 2 layers: 96 tokens, the longest request stores 69), admitting on the next step's room alone
    (headroom=0): preemptions."""
    m = model(n_kv_head)
    reqs = requests(10, seed=n_kv_head)
    engine = Engine(m, "full", n_blocks=per_head * n_kv_head, max_batch=max_batch, headroom=0)
    done = engine.generate(reqs)
    for request, completion in zip(reqs, done):
        assert completion.tokens == alone(m, request), f"request {completion.id} differs in a batch"
        assert completion.finish_reason == "length" and len(completion.tokens) == request.max_tokens
    if per_head == 12:
        assert engine.stats.preemptions > 0  # the pool was tight enough to preempt
    assert all_free(engine)  # every block back: no leak
    assert engine.cache.batch_size == 0 and not engine.has_work()


def test_admission_keeps_room_for_the_running_batch_to_grow():
    """With a headroom of n decode steps, a sequence is admitted only into blocks that the running ones will not
    take over their next n steps (none past their max_tokens): in the tiny pool that preempts above, fewer
    preemptions, the same outputs, no leak."""
    m = model(4)
    reqs = requests(10, seed=4)
    preemptions, outputs = {}, {}
    for headroom in (0, 8, 64):
        engine = Engine(m, "full", n_blocks=48, max_batch=8, headroom=headroom)
        outputs[headroom] = [c.tokens for c in engine.generate(reqs)]
        preemptions[headroom] = engine.stats.preemptions
        assert all_free(engine)
    assert preemptions[0] > preemptions[8] >= preemptions[64]
    assert outputs[0] == outputs[8] == outputs[64]
    scheduler = engine.scheduler  # 2 layers x 4 KV heads, blocks of 16 tokens
    seq = Sequence.of(0, Request(prompt=[1] * 20, max_tokens=40), CPU)
    assert scheduler.growth_ahead(seq) == 8 * 3  # 40 tokens left (under 64): three blocks per head at most
    seq.output = [1] * 35
    assert scheduler.growth_ahead(seq) == 8 * 1  # 5 tokens left
    seq.output = []
    seq.request = replace(seq.request, max_cache_tokens=8, compress_once=False)
    assert scheduler.growth_ahead(seq) == 8 * 1  # its prefill's 2 blocks a head, compressed to 1, then 2 at most
    seq.output = [1] * 35
    seq.evicting = replace(PRESETS["window"], budget=12)
    assert scheduler.growth_ahead(seq) == 0  # its prefill stores 55 tokens, then it evicts to 28 at most
    seq.status, seq.held_blocks = Status.RUNNING, 8 * 1  # running at its budget: a block a head until it evicts
    assert scheduler.growth_ahead(seq) == 8 * 1
    with pytest.raises(ValueError, match="headroom=-1"):
        Engine(m, "full", n_blocks=48, headroom=-1)


def test_the_headroom_never_reclaims_prefix_blocks():
    """Blocks the prefix cache keeps count toward the headroom, but admission reclaims only what the prompts and
    the next step take: an entry a waiting prompt may reuse is not dropped to keep room that may never be used."""
    pool = SimpleNamespace(n_free=4, n_blocks=1000, block_tokens=16)
    reclaimed = []
    scheduler = Scheduler(pool, 1, 1, 8, 4096, reclaim=reclaimed.append, headroom=64, reclaimable=lambda: 10)
    running = Sequence.of(0, Request(prompt=[1] * 16, max_tokens=100), CPU)
    running.status, running.held_blocks = Status.RUNNING, 2
    scheduler.running = [running]
    scheduler.waiting.append(Sequence.of(1, Request(prompt=[1] * 16, max_tokens=8), CPU))
    assert len(scheduler.admit()) == 1 and reclaimed == []  # 2 blocks + 4 of headroom: 4 free, 10 reclaimable
    scheduler.reclaimable = lambda: 1
    scheduler.waiting.append(Sequence.of(2, Request(prompt=[1] * 16, max_tokens=8), CPU))
    assert scheduler.admit() == [] and reclaimed == []  # short of the headroom: it waits


@pytest.mark.parametrize("n_blocks", [2000, 140], ids=["roomy", "tiny"])
def test_kivi_requests_get_their_output_alone_and_pay_for_their_residual(n_blocks):
    """KIVI in the pool: whole flushes of R = 16 tokens in blocks, the residual beside them charged to each running
    sequence in blocks (43 here: K and V of 16 float32 tokens, 2 layers, 2 KV heads, in blocks of 96 bytes). A
    tiny pool holds three sequences at most, and preempts as they grow (admitting on the next step's room alone)."""
    m = model()
    spec = replace(PRESETS["kivi2"], group_size=8, residual=16, block_tokens=8)
    reqs = requests(8, seed=5)
    engine = Engine(m, spec, n_blocks=n_blocks, max_batch=8, headroom=0)
    assert engine.scheduler.per_sequence == 43 and engine.prefix is None
    with pytest.raises(ValueError, match="max_cache_tokens: cache=kivi2 .* cannot evict"):
        engine.add(Request([1, 2, 3], max_cache_tokens=8))
    engine.add(reqs[0])
    engine.step()  # its prefill: its blocks and its charge
    row = engine.cache.layers[0].store
    assert engine.pool.blocks_in_use() == 2 * row.blocks_held() + 43
    engine.abort(0)
    done = engine.generate(reqs)
    for request, completion in zip(reqs, done):
        assert completion.tokens == alone(m, request, spec), f"request {completion.id} differs in a batch"
    assert (engine.stats.preemptions > 0) == (n_blocks == 140)
    assert all_free(engine)


def test_gear_requests_get_their_output_alone():
    """GEAR in the pool (a block: one chunk of 16 tokens, decoded then attended), each sequence charged its buffer."""
    m = model()
    spec = replace(PRESETS["gear2"], group_size=8, residual=16, block_tokens=16)
    reqs = requests(6, seed=6)
    engine = Engine(m, spec, n_blocks=400, max_batch=6)
    assert engine.scheduler.per_sequence == 11  # 4,096 bytes of buffer in blocks of 400 (codes, factors, outliers)
    for request, completion in zip(reqs, engine.generate(reqs)):
        assert completion.tokens == alone(m, request, spec), f"request {completion.id} differs in a batch"
    assert all_free(engine)


def test_a_prompt_longer_than_a_prefill_step_is_prefilled_in_chunks_with_the_same_output():
    m = model()
    reqs = requests(4, seed=11)
    engine = Engine(m, n_blocks=200, max_prefill_tokens=7)  # every prompt of more than 7 tokens: in chunks
    done = engine.generate(reqs)
    assert [c.tokens for c in done] == [alone(m, r) for r in reqs]
    assert engine.stats.prefill_steps == 4 and engine.stats.prefill_tokens == sum(len(r.prompt) for r in reqs)


def test_arrival_order_and_late_arrivals_do_not_change_outputs():
    m = model()
    reqs = requests(6, seed=7)
    engine = Engine(m, QUANT4, n_blocks=40, max_batch=4)
    got: dict[int, list[int]] = {}
    ids = {}
    for i in (5, 2, 0):  # three now, the rest while they run
        ids[engine.add(reqs[i])] = i
    for i in (1, 4, 3):
        for c in engine.step():
            got[ids[c.id]] = c.tokens
        ids[engine.add(reqs[i])] = i
    while engine.has_work():
        got.update((ids[c.id], c.tokens) for c in engine.step())
    assert [got[i] for i in range(6)] == [alone(m, r, QUANT4) for r in reqs]
    assert all_free(engine)


def test_a_seeded_sampler_draws_the_same_tokens_in_a_batch_as_alone():
    m = model()
    reqs = [Request(r.prompt, r.max_tokens, Sampling(temperature=1.0, top_k=20, seed=i))
            for i, r in enumerate(requests(5, seed=3))]
    done = Engine(m, n_blocks=16, max_batch=5).generate(reqs)  # a small pool: preemptions keep the generators
    assert [c.tokens for c in done] == [alone(m, r) for r in reqs]


def test_stop_ids_and_stop_strings_end_a_request_and_keep_the_stop():
    m = model()
    prompt = requests(1, seed=5)[0].prompt
    free_run = alone(m, Request(prompt, max_tokens=20))
    stop_id = free_run[6]
    first = free_run.index(stop_id)
    text = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)  # noqa: E731  a made-up tokenizer
    engine = Engine(m, n_blocks=100, decode=text)
    by_id, by_string, by_length = engine.generate([
        Request(prompt, max_tokens=20, stop_ids=(stop_id,)),
        Request(prompt, max_tokens=20, stop=(text(free_run[3:5]),)),
        Request(prompt, max_tokens=4)])
    assert by_id.tokens == free_run[: first + 1] and by_id.finish_reason == "stop"
    assert text(by_string.tokens).endswith(text(free_run[3:5])) and by_string.finish_reason == "stop"
    assert len(by_string.tokens) <= 5
    assert by_length.tokens == free_run[:4] and by_length.finish_reason == "length"
    assert by_length.time_to_first_token <= by_length.latency


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


@pytest.mark.parametrize("request_, field", [
    (Request(prompt=[], max_tokens=4), "prompt"),
    (Request(prompt=[1, 2], max_tokens=0), "max_tokens"),
    (Request(prompt=list(range(90)), max_tokens=60), "max_tokens"),  # 150 tokens: more than the pool holds
    (Request(prompt=list(range(257)), max_tokens=1), "prompt: 257 tokens, more than the engine's max_context=256"),
    (Request(prompt=[1, 2], max_cache_tokens=0), "max_cache_tokens"),
    (Request(prompt=[1, 2], protected_window_size=-1), "protected_window_size"),
])
def test_requests_it_cannot_serve_are_refused_naming_the_field(request_, field):
    engine = Engine(model(), n_blocks=32)  # 32 blocks of 16 tokens over 2 layers x 2 KV heads: 128 tokens
    with pytest.raises(ValueError, match=field):
        engine.add(request_)
    assert not engine.has_work()


def test_a_request_names_its_preset_when_its_blocks_are_the_engines():
    kvc = PRESETS["kvcompress"]
    for engine, request in ((Engine(model(), "full", n_blocks=64), Request([1, 2, 3], cache="kvcompress")),
                            (Engine(model(), "kvcompress", n_blocks=64), Request([1, 2, 3]))):
        engine.add(request)
        queued = engine.scheduler.waiting[-1].request
        assert (queued.max_cache_tokens, queued.protected_window_size) == (kvc.budget, kvc.window)
    engine.add(Request([1, 2, 3], cache="kvcompress", max_cache_tokens=7, protected_window_size=1))
    assert engine.scheduler.waiting[-1].request.max_cache_tokens == 7  # the request's own knobs win
    assert engine.scheduler.waiting[-1].request.protected_window_size == 1
    engine.add(Request([1, 2, 3], cache="full"))
    assert engine.scheduler.waiting[-1].request.max_cache_tokens is None
    engine.add(Request([1, 2, 3], cache="h2o"))  # an evicting preset: its own cohort
    assert engine.scheduler.waiting[-1].evicting == PRESETS["h2o"]
    for request, message in ((Request([1, 2, 3], cache="quant4"), "not this engine's"),
                             (Request([1, 2, 3], cache="h2o", max_cache_tokens=8), "max_cache_tokens"),
                             (Request([1, 2, 3], cache="nope"), "not a preset")):
        with pytest.raises(ValueError, match=message):
            engine.add(request)


def test_presets_outside_the_pool_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="is not a preset"):
        Engine(model(), "fulll")
    with pytest.raises(ValueError, match="keep every token"):
        Engine(model(), "minicache")


EVICTING = ["window", "sink", "h2o", "snapkv", "l2norm"]


@pytest.fixture
def small_budgets(monkeypatch):
    """The evicting presets with a budget of 12 tokens (blocks of 16), so that short requests evict."""
    for name in EVICTING:
        monkeypatch.setitem(PRESETS, name, replace(PRESETS[name], budget=12, window=4, sink=2 * (name == "sink")))


@pytest.mark.parametrize("n_blocks, max_batch", [(400, 16), (400, 3)], ids=["together", "few-rows"])
def test_evicting_presets_share_the_engine_each_request_as_alone(small_budgets, n_blocks, max_batch):
    """Requests of every evicting preset and of full, mixed: each preset's requests decode in a batch of their own
    (a cohort) in the one pool, join and leave it with their policy's state, and get their output alone."""
    m = model()
    reqs = [replace(r, cache=([None] + EVICTING)[i % 6], max_tokens=r.max_tokens + 24)  # 25-93 tokens: evicting
            for i, r in enumerate(requests(12, seed=5))]
    engine = Engine(m, "full", n_blocks=n_blocks, max_batch=max_batch)
    done = engine.generate(reqs)
    for request, completion in zip(reqs, done):
        spec = PRESETS[request.cache or "full"]
        assert completion.tokens == alone(m, request, spec), f"request {completion.id} ({spec.name}) differs"
    assert set(engine.caches) == {None, *(repr(PRESETS[name]) for name in EVICTING)} and all_free(engine)


def test_an_engine_of_an_evicting_preset_serves_it_by_default(small_budgets):
    """Beside requests naming the preset of the same name: another budget, so another cohort."""
    m = model()
    reqs = [replace(r, max_tokens=r.max_tokens + 24) for r in requests(4, seed=6)]
    own = replace(PRESETS["sink"], budget=20)
    engine = Engine(m, own, n_blocks=200)
    done = engine.generate([*reqs, *(replace(r, cache="sink") for r in reqs)])
    assert [c.tokens for c in done] == [alone(m, r, spec) for spec in (own, PRESETS["sink"]) for r in reqs]
    assert len(engine.caches) == 2


def test_a_tiny_pool_preempts_evicting_requests_too_and_leaks_nothing(small_budgets):
    """Preempted, an evicting request is recomputed from its tokens, whose prefill may keep other tokens than its
    decode steps kept: its output may differ from alone. A request keeping every token still gets its own."""
    m = model()
    reqs = [replace(r, cache=([None] + EVICTING)[i % 6], max_tokens=r.max_tokens + 24)
            for i, r in enumerate(requests(12, seed=5))]
    engine = Engine(m, "full", n_blocks=48, max_batch=16, headroom=0)
    done = engine.generate(reqs)
    assert engine.stats.preemptions > 0 and all_free(engine)
    for request, completion in zip(reqs, done):
        assert len(completion.tokens) == request.max_tokens
        if request.cache is None:
            assert completion.tokens == alone(m, request)


def test_an_evicting_request_may_ask_for_more_tokens_than_the_pool_could_keep(small_budgets):
    """Its footprint is its budget and a block per (layer, KV head): 600 new tokens in a pool of 48 blocks (192
    tokens per (layer, KV head) at most), which a request keeping every token is refused."""
    engine = Engine(model(), "full", n_blocks=48, max_context=256)
    (done,) = engine.generate([Request(prompt=list(range(20)), max_tokens=600, cache="sink")])
    assert len(done.tokens) == 600 and all_free(engine)
    heads = engine.model.config.n_layer * engine.model.config.n_kv_head
    assert 37 * heads <= engine.stats.blocks_evicted <= 39 * heads  # 619 tokens' 39 blocks per head, 2 at most held
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add(Request(prompt=list(range(20)), max_tokens=600))
