"""The serving engine (serving/engine.py): a request's output in a changing batch equals its output alone through
serving.generate (greedy tokens identical, and a seeded sampler's too), preemptions included; no block leaks; stop
conditions; requests it cannot serve are refused with a message naming the field. KV-Compress's budgets:
test_engine_kvcompress.py."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from cache.presets import PRESETS
from serving.engine import Engine
from serving.generate import Sampling
from serving.scheduler import Scheduler
from serving.sequence import Request, Sequence, Status
from engine_checks import all_free, alone, model, requests  # tests/engine_checks.py

CPU = torch.device("cpu")
QUANT4 = replace(PRESETS["quant4"], group_size=8)  # head_dim 8 here


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
    assert scheduler.growth_ahead(seq) == 0  # it compresses back as it grows: the batch of such rows stays level
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
