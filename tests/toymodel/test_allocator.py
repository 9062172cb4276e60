"""toymodel/allocator.py: on Linux with glibc, keep_freed_memory() takes effect (checked in a fresh process, so the
test session's own malloc keeps its defaults); train.py's and infer.py's keep_freed_memory knobs are plain booleans
of their schemas, on by default."""

import subprocess
import sys

import pytest

from serving.config import InferConfig
from training.config import TrainConfig


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_takes_effect_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-c", "from toymodel.allocator import keep_freed_memory as k; print(k())"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_the_knob_is_on_by_default_and_can_be_turned_off():
    for config in (TrainConfig, InferConfig):
        assert config().keep_freed_memory is True
        assert config(keep_freed_memory=False).keep_freed_memory is False
