"""The range check every config uses: intervals include or exclude their bounds as written, a nested config is
checked through its groups with full keys, and an unset optional number passes."""

import math
from dataclasses import dataclass, field

import pytest

from toymodel.ranges import check_ranges, in_range, parse_range


@dataclass
class Inner:
    rate: float = field(default=0.5, metadata={"range": "(0, 1]"})
    limit: int | None = field(default=None, metadata={"range": "[1, inf)"})


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = field(default=3, metadata={"range": "[1, inf)"})
    name: str = "x"  # no range: not checked


def test_intervals_parse_and_include_their_bounds_as_written():
    assert parse_range("[1, inf)") == (1.0, math.inf, True, False)
    assert parse_range("(0, 1]") == (0.0, 1.0, False, True)
    assert in_range(1.0, "(0, 1]") and not in_range(0.0, "(0, 1]") and not in_range(math.nan, "[0, inf)")
    assert in_range(math.inf, "(0, inf]") and not in_range(math.inf, "(0, inf)")
    with pytest.raises(ValueError, match="not an interval"):
        parse_range("1..10")


def test_nested_fields_are_named_by_their_full_key():
    check_ranges(Outer(), "run")  # defaults pass, and limit=None (unset) passes
    with pytest.raises(ValueError, match=r"^run\.inner\.rate=0\.0 must be in \(0, 1\]$"):
        check_ranges(Outer(inner=Inner(rate=0.0)), "run")
    with pytest.raises(ValueError, match=r"^inner\.limit=0 must be in \[1, inf\)$"):
        check_ranges(Outer(inner=Inner(limit=0)))
    with pytest.raises(ValueError, match=r"^steps=0 must be"):
        check_ranges(Outer(steps=0))
