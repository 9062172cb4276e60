"""train.dtype (training/precision.py): auto picks bfloat16 exactly where the device computes it natively, and a
name it does not know is refused."""

import pytest
import torch

from training import precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,expected", [("fpu avx512f avx512_bf16 sse", "bfloat16"),
                                            ("fpu amx_bf16 sse", "bfloat16"), ("fpu avx2 avx512f", "float32")])
def test_auto_follows_the_cpus_bf16_flags(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
    monkeypatch.setattr(precision, "Path", lambda _: cpuinfo)
    assert precision.resolve_dtype("auto", CPU) == expected
    assert precision.resolve_dtype("float32", CPU) == "float32"  # an explicit choice stands


def test_an_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="train.dtype='fp8' is not supported; choose one of auto, bfloat16"):
        precision.resolve_dtype("fp8", CPU)


def test_autocast_runs_products_in_bf16_only_when_asked():
    x = torch.randn(4, 8)
    with precision.autocast("bfloat16", CPU):
        assert (x @ x.T).dtype == torch.bfloat16
    with precision.autocast("float32", CPU):
        assert (x @ x.T).dtype == torch.float32
