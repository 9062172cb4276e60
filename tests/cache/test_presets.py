"""Presets and build_cache: every preset builds and runs; every invalid combination fails at build time with a
ValueError that names the problem."""

from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from cache.presets import PRESETS, CacheSpec, build_cache
from toymodel.config import ModelConfig

CPU = torch.device("cpu")
CONFIG = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64)  # head_dim 8
CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "cache"


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_decodes(make_model, run_chunks, name):
    spec = replace(PRESETS[name], group_size=8, residual=16, budget=min(PRESETS[name].budget, 12), window=4,
                   block_tokens=16)
    model = make_model(2)
    cache = build_cache(spec, model.config, 2, CPU, torch.float32)
    logits = run_chunks(model, torch.randint(0, 97, (2, 24)), cache, [10])
    assert logits.shape == (2, 24, 97) and torch.isfinite(logits).all()
    assert cache.pos.tolist() == [24, 24] and cache.total_bytes() > 0


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_naive_path_decodes_what_the_kernels_decode(make_model, run_chunks, name):
    """cache.attend=naive (gather, decode, then attend: the research code's way) against the fused kernels: the
    same logits within float32 rounding, through a prefill and 14 decode steps."""
    spec = replace(PRESETS[name], group_size=8, residual=16, budget=min(PRESETS[name].budget, 12), window=4,
                   block_tokens=16)
    model, idx = make_model(2), torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    logits = [run_chunks(model, idx, build_cache(replace(spec, attend=attend), model.config, 2, CPU, torch.float32),
                         [10]) for attend in ("fused", "naive")]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_the_presets_the_configs_name():
    assert list(PRESETS) == [
        "full", "window", "sink", "h2o", "snapkv", "l2norm", "kvcompress", "quant8", "quant4", "kivi4", "kivi2",
        "sink_int4", "gear4", "gear2", "minicache", "minicache_int4",
    ]
    assert all(spec.name == name for name, spec in PRESETS.items())


def test_full_yaml_lists_every_field_at_its_default():
    """full.yaml is the base every other preset file starts from, so each field it lists is a command-line knob of
    every preset (Hydra refuses to override a key the composed YAML lacks)."""
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load((CONF_DIR / "full.yaml").read_text())
    assert list(values) == [f.name for f in fields(CacheSpec)]
    assert CacheSpec(**values) == CacheSpec() == PRESETS["full"]


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_presets_mirror_the_registry(path):
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load(path.read_text())
    defaults = values.pop("defaults", None)
    assert values["name"] in PRESETS, f"{path.name} names a preset that cache/presets.py does not define"
    unknown = set(values) - {f.name for f in fields(CacheSpec)}
    assert not unknown, f"{path.name} has fields CacheSpec lacks: {unknown}"
    if path.stem != "full":
        assert defaults == ["full"], f"{path.name} must start from full.yaml: `defaults: [full]`"
        base = yaml.safe_load((CONF_DIR / "full.yaml").read_text())
        assert all(values[k] != base[k] for k in values if k != "name"), f"{path.name} restates a full.yaml value"
        values = {**base, **values}  # what Hydra composes
    assert CacheSpec(**values) == PRESETS[values["name"]]  # every field, as cache/presets.py says


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(policy="lru"), "valid policies: full, window, sink"),
        (dict(codec="zip"), "valid codecs: fp, fp16, int2, int4, int8"),
        (dict(codec="int3"), "unknown codec 'int3'"),
        (dict(codec="kivi5"), "unknown codec 'kivi5'"),
        (dict(codec="int4", group_size=3), "group_size=3 does not divide head_dim=8"),
        (dict(policy="h2o", budget=10, sink=4, window=8), "sink + window = 4 + 8"),
        (dict(policy="window", budget=0, sink=0, window=0), "budget=0 must be at least 1"),
        (dict(policy="sink", budget=16, window=0, codec="kivi4", group_size=8, residual=16), "combined with eviction"),
        (dict(policy="snapkv", budget=16, window=0, sink=0), "observation window"),
        (dict(policy="kvcompress", budget=16, window=4, kernel=4), "kernel=4"),
        (dict(policy="sink", budget=16, sink=0, window=0), "cache.sink=0"),
        (dict(codec="kivi4", group_size=8, residual=12), "residual=12"),
        (dict(codec="kivi4", group_size=8, residual=16, block_tokens=12), "block_tokens=12 .*cache.block_tokens=8"),
        (dict(window=-1), "cache.window=-1"),
        (dict(attend="fast"), "cache.attend='fast'"),
    ],
)
def test_invalid_specs_fail_with_a_message(change, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        build_cache(replace(CacheSpec(), **change), CONFIG, 1, CPU, torch.float32)


def test_a_store_with_one_length_per_batch_refuses_a_ragged_step():
    cache = build_cache(PRESETS["minicache"], CONFIG, 2, CPU, torch.float32)
    with pytest.raises(ValueError, match="pad the prompts to one length"):
        cache.positions(5, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match=r"lengths must be \(2,\) counts in \[1, T=5\]"):
        cache.positions(5, torch.tensor([6, 3]))
