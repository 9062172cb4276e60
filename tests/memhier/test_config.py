"""The memhier config group: on.yaml carries every MemhierSpec field, off.yaml starts from it, and both pass
infer's schema with any knob overridden; caches whose tokens cannot be cut into blocks are refused."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cache.presets import PRESETS
from memhier.cache import MemhierSpec, check_memhier
from serving.config import InferConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("choice, enabled", [("on", True), ("off", False)])
def test_memhier_group_files_match_the_schema(choice, enabled):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        composed = compose("infer", overrides=[f"memhier={choice}", "memhier.device_bytes=65536"])
    assert set(composed.memhier) == {f.name for f in dataclasses.fields(MemhierSpec)}  # every knob overridable
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InferConfig), composed))
    assert typed.memhier.enabled is enabled and typed.memhier.device_bytes == 65536


def test_off_sets_only_enabled():
    raw = OmegaConf.load(CONF / "memhier" / "off.yaml")
    assert OmegaConf.to_container(raw) == {"defaults": ["on"], "enabled": False}  # the knobs are on.yaml's


def test_infer_defaults_quote_the_memhier_choice():
    assert '- memhier: "off"' in (CONF / "infer.yaml").read_text()  # unquoted, YAML 1.1 reads off as false


def test_memhier_refuses_minicache_whose_tokens_two_layers_share():
    with pytest.raises(ValueError, match="memhier=on cannot hold cache=minicache"):
        check_memhier(MemhierSpec(enabled=True), PRESETS["minicache"])




@pytest.mark.parametrize("knobs", [{}, {"mode": "retrieval"}, {"persist": True}])
def test_gear_goes_wherever_the_pool_goes(knobs):
    check_memhier(MemhierSpec(enabled=True, **knobs), PRESETS["gear4"])  # a block is one whole chunk


def test_representatives_are_some_of_a_pool_blocks_keys():
    with pytest.raises(ValueError, match="memhier.rep_keys=32 must be at most cache.block_tokens=16"):
        check_memhier(MemhierSpec(enabled=True, mode="retrieval", rep_keys=32), PRESETS["quant4"])

