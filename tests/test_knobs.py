"""Every number a user can set on train.py's or infer.py's command line declares its valid range beside its field
(toymodel/ranges.py), and the config is refused when it is built if a number lies outside: at each finite bound,
the value just inside passes and the value just outside is refused with the key's full name, the value and the
range. The knobs are read off the schemas, so a new one is covered (or fails here for lack of a range) at once."""

import copy
import functools
import math
import sys
import types
from dataclasses import Field, fields, is_dataclass
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import infer  # noqa: E402
import train  # noqa: E402
from serving.config import InferConfig  # noqa: E402
from toymodel.ranges import check_ranges, in_range, parse_range  # noqa: E402
from training.config import TrainConfig  # noqa: E402

SCRIPTS = {"train": (train, TrainConfig), "infer": (infer, InferConfig)}


def number_type(hint: object) -> type | None:
    """int or float for a field that holds a number (`int`, `float | None`, ...), else None (bool is no number)."""
    if get_origin(hint) in (Union, types.UnionType):
        hint = next((a for a in get_args(hint) if a is not type(None)), None)
    return hint if hint in (int, float) else None


def numeric_knobs(schema: type, prefix: str = "") -> list[tuple[str, type, Field]]:
    """(full key, int or float, the field) for every number in `schema`, through its nested groups."""
    hints, found = get_type_hints(schema), []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        if is_dataclass(hints[f.name]):
            found += numeric_knobs(hints[f.name], f"{key}.")
        elif number_type(hints[f.name]) is not None:
            found.append((key, number_type(hints[f.name]), f))
    return found


KNOBS = [(script, key, kind, f) for script, (_, schema) in SCRIPTS.items() for key, kind, f in numeric_knobs(schema)]


def boundary_cases() -> list:
    """(script, key, value, accepted) just inside and just outside every finite bound of every declared range."""
    cases = []
    for script, key, kind, f in KNOBS:
        if "range" not in f.metadata:
            continue  # test_every_number_declares_a_range fails for it
        lo, hi, lo_included, hi_included = parse_range(f.metadata["range"])
        for bound, included, outward in ((lo, lo_included, -1), (hi, hi_included, 1)):
            if math.isinf(bound):
                continue
            if kind is int:  # the nearest integers on either side of an integer bound
                inside, outside = (bound, bound + outward) if included else (bound - outward, bound)
                inside, outside = int(inside), int(outside)
            else:  # the nearest floats
                step = math.nextafter(bound, outward * math.inf)
                inside, outside = (bound, step) if included else (math.nextafter(bound, -outward * math.inf), bound)
            cases += [pytest.param(script, key, inside, True, id=f"{script}-{key}={inside}"),
                      pytest.param(script, key, outside, False, id=f"{script}-{key}={outside}")]
    return cases


@pytest.fixture(scope="module")
def composed() -> dict:
    """Each script's composed default config (Hydra's output before the schema sees it)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return {script: compose(script) for script in SCRIPTS}


@pytest.mark.parametrize("script,key,kind,f", KNOBS, ids=[f"{s}-{k}" for s, k, _, _ in KNOBS])
def test_every_number_declares_a_range(script, key, kind, f):
    assert "range" in f.metadata, f"{script}.py's {key} declares no range: add metadata={{'range': '[lo, hi]'}}"
    assert f.default is None or in_range(f.default, f.metadata["range"]), f"the default of {key} is outside its range"


@pytest.mark.parametrize("script,key,value,accepted", boundary_cases())
def test_a_number_at_its_bounds(composed, script, key, value, accepted):
    module, _ = SCRIPTS[script]
    if accepted:  # the range lets it through (whatever other fields it must agree with)
        config = module.to_typed(composed[script])
        *groups, name = key.split(".")
        setattr(functools.reduce(getattr, groups, config), name, value)
        check_ranges(config)
        return
    cfg = copy.deepcopy(composed[script])
    OmegaConf.update(cfg, key, value)
    with pytest.raises(SystemExit) as refused:  # at config time: to_typed, before any model or file is touched
        module.to_typed(cfg)
    message = str(refused.value.code)
    assert f"{key}={value} must be in " in message and "\n" not in message, message

