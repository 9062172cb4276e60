"""Fixtures every test package may use."""

from typing import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tests on tiny tensors run on one intra-op thread: a second one only fights other processes for the two
    cores (20-50x slower on a busy machine). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
