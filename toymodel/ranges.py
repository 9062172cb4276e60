"""Valid ranges of config numbers: declared beside the fields they bound, checked by one function.

A config dataclass declares each number's range in its field's metadata, in interval notation, where `[` and `]`
include the bound and `(` and `)` exclude it:

    lr: float = field(default=2e-3, metadata={"range": "(0, inf)"})    # lr > 0
    top_p: float = field(default=1.0, metadata={"range": "(0, 1]"})    # 0 < top_p <= 1

`check_ranges(config, "train")` tests every declared field and recurses into fields that are dataclasses
themselves, so one call at the top checks a whole config, and the error names the full key, the value and the
range: `train.ckpt_interval=0 must be in [1, inf)`. A field set to None (an optional knob left unset) passes.

A range says what one number may be on its own. What depends on two fields (n_head divisible by n_kv_head,
budget >= sink + window) stays with the code that owns the combination (cache.presets.check_spec, ...).
The declarations are plain data, so a package that imports nothing of ours (corpus, tracking) can declare
ranges too: the config that holds its dataclass checks them.
"""

import re
from dataclasses import fields, is_dataclass

# Ranges many fields share.
POSITIVE = {"range": "[1, inf)"}  # a count or a size
NON_NEGATIVE = {"range": "[0, inf)"}  # a count or a budget where 0 means none
SEED = {"range": "[0, 4294967295]"}  # a seed every generator accepts (numpy's limit, 2**32 - 1)

NUMBER = r"-?inf|[-+0-9.e]+"
INTERVAL = re.compile(rf"([\[(])\s*({NUMBER})\s*,\s*({NUMBER})\s*([\])])")


def parse_range(text: str) -> tuple[float, float, bool, bool]:
    """'[1, inf)' -> (1.0, inf, True, False): the two bounds, and whether each is included."""
    match = INTERVAL.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"range {text!r} is not an interval such as '[1, inf)' or '(0, 1]'")
    opening, lo, hi, closing = match.groups()
    return float(lo), float(hi), opening == "[", closing == "]"


def in_range(value: float, text: str) -> bool:
    """Whether `value` lies in the interval `text` (NaN never does)."""
    lo, hi, lo_included, hi_included = parse_range(text)
    above = value >= lo if lo_included else value > lo
    below = value <= hi if hi_included else value < hi
    return above and below


def check_ranges(config: object, prefix: str = "") -> None:
    """Raise ValueError naming the key, the value and the range of the first field of `config` (a dataclass,
    searched depth-first through its dataclass fields) whose value lies outside its declared range.

    prefix: the config group's key, e.g. "train" for train.ckpt_interval; "" for a top-level config."""
    for f in fields(config):
        value, key = getattr(config, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(value):
            check_ranges(value, key)
        elif "range" in f.metadata and value is not None and not in_range(value, f.metadata["range"]):
            raise ValueError(f"{key}={value} must be in {f.metadata['range']}")
