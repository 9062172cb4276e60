"""Fixtures every test package may use.

The Triton kernels (toymodel/kernels/triton_attn.py, cache/kernels/triton_decode.py) and their fixtures:
Without a GPU the kernels run under Triton's CPU interpreter. Triton reads TRITON_INTERPRET when `@triton.jit`
runs: for its own helpers (tl.zeros, tl.max, ...) when `triton` is first imported, for ours when our module is,
and for a few parts it imports lazily at the first launch. Other code imports triton too (PyTorch's optimizers
probe for it while a training test runs), so on a machine without a GPU we import triton here, at collection,
before any test runs. The env var itself is set only around that import and around the tests that use the
`attn_kernels` / `decode_kernels` fixtures: other test modules must not inherit it (one checks that the Triton
backend refuses to start on a machine without a GPU).
"""

import importlib
import importlib.util
import sys
from types import ModuleType
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

def _import_triton_for_the_interpreter() -> None:
    if torch.cuda.is_available() or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        importlib.import_module("triton.language")
        importlib.import_module("triton.experimental.gluon")  # the first launch imports it, and it checks the mode


_import_triton_for_the_interpreter()


def _kernels(name: str) -> Iterator[ModuleType]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        yield importlib.import_module(name)
        return
    triton = sys.modules.get("triton")
    if triton is not None and isinstance(triton.language.zeros, triton.runtime.JITFunction):
        pytest.skip("triton was imported without TRITON_INTERPRET=1 earlier in this process; run these tests alone")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield importlib.import_module(name)


@pytest.fixture(scope="module")
def attn_kernels() -> Iterator[ModuleType]:
    """toymodel.kernels.triton_attn, compiled on a GPU, interpreted on a CPU."""
    yield from _kernels("toymodel.kernels.triton_attn")


@pytest.fixture(scope="module")
def decode_kernels() -> Iterator[ModuleType]:
    """cache.kernels.triton_decode, compiled on a GPU, interpreted on a CPU."""
    yield from _kernels("cache.kernels.triton_decode")


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill every new floating-point buffer with NaN while a test runs, so elements a kernel forgets to write
    show up in the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_fill(empty_like(*a, **kw)))
