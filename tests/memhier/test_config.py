"""The memhier config group: on.yaml and off.yaml carry every MemhierSpec field and pass infer's schema."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from memhier.cache import MemhierSpec
from serving.config import InferConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("choice, enabled", [("on", True), ("off", False)])
def test_memhier_group_files_match_the_schema(choice, enabled):
    raw = OmegaConf.load(CONF / "memhier" / f"{choice}.yaml")
    assert set(raw) == {f.name for f in dataclasses.fields(MemhierSpec)}  # every knob overridable either way
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InferConfig), {"memhier": raw}))
    assert typed.memhier.enabled is enabled


def test_infer_defaults_quote_the_memhier_choice():
    assert '- memhier: "off"' in (CONF / "infer.yaml").read_text()  # unquoted, YAML 1.1 reads off as false
