"""Persistent prefix reuse: content addresses are the same in every process, a new process finds what an earlier
one stored, reusing a prefix gives the cold prefill's tokens and logits (the reused blocks bit for bit), the
store evicts instead of outgrowing its budget, and a damaged entry is recomputed, never used."""

import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memhier.tiers
from cache.presets import PRESETS
from memhier.cache import MemhierSpec, make_cache
from memhier.persist import PrefixStore, block_addresses, weights_digest
from memhier.tiers import HEADER
from serving.generate import Sampling, generate

ROOT = Path(__file__).resolve().parents[2]

# One program for this process and for subprocesses: a seeded model, a prompt, a persistent cache in argv[1].
SETUP = """
import dataclasses, torch
from cache.presets import PRESETS
from memhier.cache import MemhierSpec, make_cache
from memhier.persist import block_addresses, weights_digest
from toymodel.config import ModelConfig
from toymodel.model import Transformer

def setup(persist_dir):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64)
    model = Transformer(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    spec = MemhierSpec(enabled=True, device_bytes=1024, host_bytes=1024, spill_dir=persist_dir, persist=True,
                       persist_dir=persist_dir + "/prefix")
    preset = dataclasses.replace(PRESETS["quant4"], group_size=8, block_tokens=8)
    cache = make_cache(preset, spec, config, 1, torch.device("cpu"), torch.float32, weights_digest(model))
    return model, prompt, cache
"""


def run_setup(persist_dir: Path, then: str) -> str:
    """Run SETUP + `then` in a fresh interpreter (its own hash seed), return its stdout."""
    return subprocess.run([sys.executable, "-c", SETUP + then, str(persist_dir)], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "random"}).stdout


def setup(persist_dir: Path):
    scope: dict = {}
    exec(SETUP, scope)
    return scope["setup"](str(persist_dir))


def test_content_address_is_identical_in_two_processes(tmp_path):
    then = ("import sys\nmodel, prompt, cache = setup(sys.argv[1])\n"
            "print(weights_digest(model), *block_addresses(cache.root, prompt, 8))")
    first, second = run_setup(tmp_path, then), run_setup(tmp_path, then)
    assert first == second and len(first.split()) == 1 + 40 // 8
    model, prompt, cache = setup(tmp_path)  # and this process agrees
    assert first.split() == [weights_digest(model), *block_addresses(cache.root, prompt, 8)]
    cache.close()


def test_persisted_store_is_found_by_a_new_process(tmp_path):
    run_setup(tmp_path, "import sys\nmodel, prompt, cache = setup(sys.argv[1])\ncache.prefill(model, prompt)\n")
    assert len(list((tmp_path / "prefix").glob("*.kvp"))) == 40 // 8  # the prompt's whole blocks
    assert [p.name for p in tmp_path.iterdir()] == ["prefix"]  # the other process's spill directory is gone
    model, prompt, cache = setup(tmp_path)
    cold_model, _, cold = setup(tmp_path / "elsewhere")
    with torch.inference_mode():
        logits = cache.prefill(model, prompt)
        reference = cold.prefill(cold_model, prompt)
    assert cache.reused_blocks == (40 - 1) // 8 and cache.skipped_tokens == 32  # the last block is computed
    assert cache.figures()["memhier_prefix_hits"] == 4
    torch.testing.assert_close(logits[:, -1], reference[:, -1], rtol=0, atol=1e-5)
    cache.close(), cold.close()


def test_reusing_a_prefix_matches_a_cold_prefill(tmp_path):
    model, prompt, cold = setup(tmp_path)
    greedy = Sampling(temperature=0)
    first = generate(model, prompt[:, :30], cold, 12, greedy, prefill=cold.prefill)  # stores 3 blocks
    stored = cold.prompt_blobs([0, 1, 2])  # every layer's bytes of each block
    longer = torch.cat([prompt[:, :30], first.tokens, prompt[:, :5]], dim=1)  # (1, 47): shares 24 tokens + more
    _, _, warm = setup(tmp_path)
    _, _, reference = setup(tmp_path / "elsewhere")  # an empty store: a cold prefill of the same prompt
    reused = generate(model, longer, warm, 20, greedy, prefill=warm.prefill)
    cold_run = generate(model, longer, reference, 20, greedy, prefill=reference.prefill)
    assert warm.reused_blocks == 3 and reference.reused_blocks == 0
    assert torch.equal(reused.tokens, cold_run.tokens)
    for old, new in zip(stored, warm.prompt_blobs([0, 1, 2])):  # the reused blocks: the first run's bytes
        assert all(torch.equal(a, b) for a, b in zip(old, new))
    assert warm.pos.tolist() == reference.pos.tolist() == [47 + 19]  # RoPE positions counted the reused tokens
    for c in (cold, warm, reference):
        c.close()
    assert len(list((tmp_path / "prefix").glob("*.kvp"))) == 47 // 8  # the longer prompt's new blocks were added


def entry(seed: int, n: int = 100) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for _ in range(2)]  # two layers' blobs


def test_over_budget_store_evicts_instead_of_growing(tmp_path):
    store = PrefixStore(tmp_path, budget=3 * 200)
    for i in range(5):
        store.save(f"{i:064x}", entry(i))
        assert store.used <= store.budget
    assert sorted(store.entries) == [f"{i:064x}" for i in (2, 3, 4)]  # the least recently used went first
    assert sorted(p.stem for p in tmp_path.glob("*.kvp")) == sorted(store.entries)
    store.touch([f"{2:064x}"])
    store.save(f"{5:064x}", entry(5))  # 3 is now the least recently used
    assert f"{3:064x}" not in store.entries and f"{2:064x}" in store.entries
    assert store.stats()["evicted"] == 3
    reopened = PrefixStore(tmp_path, budget=3 * 200)  # a new process sees the same entries, in the same order
    assert list(reopened.entries) == list(store.entries) and reopened.used == store.used


def test_full_disk_while_persisting_leaves_the_store_consistent(tmp_path, monkeypatch):
    store = PrefixStore(tmp_path, budget=10_000)
    store.save("a" * 64, entry(0))

    def no_space(f, data: bytes) -> None:
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(memhier.tiers, "write_bytes", no_space)
    with pytest.raises(OSError, match="no space left"):
        store.save("b" * 64, entry(1))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["a" * 64 + ".kvp"]  # no temporary file, no half entry
    assert list(store.entries) == ["a" * 64] and store.used == 200
    assert torch.equal(store.load("a" * 64, 200), torch.cat(entry(0)))


def damage(path: Path, how: str) -> None:
    """Damage a stored entry as a disk or a user might: flip one payload bit, cut the file short, or delete it."""
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[HEADER.size + 3] ^= 0x01
        path.write_bytes(bytes(raw))
    elif how == "truncate":
        path.write_bytes(bytes(raw[: HEADER.size + 10]))
    else:
        path.unlink()


def stored_prefill(tmp_path: Path):
    """A prompt prefilled once into the store at tmp_path: (model, prompt, last logits, entry paths in order)."""
    model, prompt, cold = setup(tmp_path)
    with torch.inference_mode():
        reference = cold.prefill(model, prompt)[:, -1]
    cold.close()
    return model, prompt, reference, [cold.prefix.path(a) for a in block_addresses(cold.root, prompt, 8)]


def sound(path: Path, tmp_path: Path) -> bool:
    """Whether the entry at path is there and passes its checks."""
    if not path.exists():
        return False
    return PrefixStore(tmp_path / "prefix", 10**9).load(path.stem, path.stat().st_size - HEADER.size) is not None


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_damaged_persisted_block_is_recomputed_not_used(tmp_path, how):
    model, prompt, reference, entries = stored_prefill(tmp_path)
    size = entries[1].stat().st_size
    damage(entries[1], how)  # the entry of block 1
    _, _, warm = setup(tmp_path)
    with torch.inference_mode():
        logits = warm.prefill(model, prompt)[:, -1]
    assert warm.reused_blocks == 1  # block 0 reused; block 1 is bad, so it and everything after are recomputed
    assert warm.prefix.stats()["bad"] == (how != "delete")
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
    assert entries[1].stat().st_size == size and sound(entries[1], tmp_path)  # rewritten from the recomputed tokens
    warm.close()


def test_a_store_with_several_damaged_entries_heals_in_one_run(tmp_path):
    model, prompt, reference, entries = stored_prefill(tmp_path)
    assert len(entries) == 5  # 40 tokens, blocks of 8; the last one is never reused (it holds the last token)
    for path, how in zip(entries[1:], ["flip", "delete", "truncate", "flip"]):
        damage(path, how)
    _, _, warm = setup(tmp_path)
    with torch.inference_mode():
        logits = warm.prefill(model, prompt)[:, -1]
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
    stats = warm.prefix.stats()
    assert warm.reused_blocks == 1 and stats["misses"] == 1  # the first damaged entry ends the reused run
    assert stats["bad"] == 3 and stats["written"] == 4  # every damaged entry seen, every bad or missing one rewritten
    assert warm.figures()["memhier_prefix_bad"] == 3
    warm.close()
    assert all(sound(path, tmp_path) for path in entries)
    _, _, healed = setup(tmp_path)
    with torch.inference_mode():
        torch.testing.assert_close(healed.prefill(model, prompt)[:, -1], reference, rtol=0, atol=1e-5)
    assert healed.reused_blocks == 4 and healed.prefix.stats()["bad"] == 0  # the next run reuses all it can
    healed.close()


def persisting(model, tmp_path: Path, directory: str, preset, **knobs):
    """A persisting cache of `preset` whose prefix store is tmp_path / directory (room for every block)."""
    spec = MemhierSpec(enabled=True, device_bytes=4096, host_bytes=4096, spill_dir=str(tmp_path), persist=True,
                       persist_dir=str(tmp_path / directory), **knobs)
    return make_cache(preset, spec, model.config, 1, torch.device("cpu"), torch.float32, weights_digest(model))


@pytest.mark.parametrize("name", ["kivi2", "gear2"])
def test_kivi_and_gear_reuse_whole_flushes_of_their_residual(tmp_path, name):
    """A residual of 16 tokens in blocks of 8 (KIVI) or one chunk of 16 (GEAR): a 38-token prompt stores the 32
    tokens it flushed, and a prompt sharing them reuses whole flushes only, so the same tokens wait in full
    precision as in a cold prefill."""
    model, prompt, _ = setup(tmp_path / "model")
    bt = 8 if name == "kivi2" else 16
    preset = dataclasses.replace(PRESETS[name], group_size=8, residual=16, block_tokens=bt)
    greedy = Sampling(temperature=0)
    first, warm, cold = (persisting(model, tmp_path, d, preset) for d in ("prefix", "prefix", "cold"))
    generate(model, prompt[:, :38], first, 4, greedy, prefill=first.prefill)  # stores the 32 flushed tokens
    longer = torch.cat([prompt[:, :38], prompt[:, :9]], dim=1)  # (1, 47): 32 flushed tokens shared, 15 more
    runs = [generate(model, longer, c, 8, greedy, prefill=c.prefill).tokens for c in (warm, cold)]
    assert warm.reused_blocks * bt == 32 and cold.reused_blocks == 0
    assert torch.equal(runs[0], runs[1])
    for c in (first, warm, cold):
        c.close()


def test_retrieval_never_leaves_a_reused_prompt_one_token_to_compute(tmp_path):
    """33 tokens in blocks of 8: reusing 4 blocks would leave one token, which would run as a decode step and read
    only the blocks retrieval chooses, where a cold prefill reads them all; so it reuses 3."""
    model, prompt, _ = setup(tmp_path / "model")
    preset = dataclasses.replace(PRESETS["quant4"], group_size=8, block_tokens=8)
    knobs = dict(mode="retrieval", topk_blocks=1, sink_blocks=1, local_blocks=1, rep_keys=2)
    greedy = Sampling(temperature=0)
    first, warm, cold = (persisting(model, tmp_path, d, preset, **knobs) for d in ("prefix", "prefix", "cold"))
    generate(model, prompt[:, :33], first, 4, greedy, prefill=first.prefill)  # stores 4 blocks
    runs = [generate(model, prompt[:, :33], c, 12, greedy, prefill=c.prefill).tokens for c in (warm, cold)]
    assert warm.reused_blocks == 3 and cold.reused_blocks == 0
    assert torch.equal(runs[0], runs[1])
    for c in (first, warm, cold):
        c.close()
