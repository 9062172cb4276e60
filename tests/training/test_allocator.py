"""training/allocator.py: on Linux with glibc, keep_freed_memory() takes effect (checked in a fresh process, so the
test session's own malloc keeps its defaults); train.py's keep_freed_memory knob is a plain boolean of the schema."""

import subprocess
import sys

import pytest

from training.config import TrainConfig


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_takes_effect_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-c", "from training.allocator import keep_freed_memory as k; print(k())"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_the_knob_is_on_by_default_and_can_be_turned_off():
    assert TrainConfig().keep_freed_memory is True
    assert TrainConfig(keep_freed_memory=False).keep_freed_memory is False
