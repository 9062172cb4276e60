"""Checks exercises/l3_pack_int4.py against the library's packing (cache.quant.pack / unpack, bits=4)."""

import pytest
import torch

from cache import quant
from conftest import load

exercise = load("l3_pack_int4")


@pytest.mark.parametrize("shape", [(2,), (3, 8), (2, 3, 5, 64), (1, 1, 1, 32)])
def test_your_bytes_are_the_librarys_bytes(shape):
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.uint8)
    want, got = quant.pack(codes, 4), exercise.pack_int4(codes)
    assert got.dtype == torch.uint8, f"packed codes must be uint8 bytes, got {got.dtype}"
    assert got.shape == want.shape, f"D={shape[-1]} codes fill {shape[-1] // 2} bytes: expected shape " \
                                    f"{tuple(want.shape)}, got {tuple(got.shape)}"
    wrong = [tuple(i) for i in (got != want).nonzero().tolist()]
    assert not wrong, (f"byte {wrong[0]} is {int(got[wrong[0]])}, the library writes {int(want[wrong[0]])}: is "
                       f"channel 2j in the low nibble and 2j + 1 in the high one?")


@pytest.mark.parametrize("shape", [(2,), (4, 16), (2, 2, 3, 32)])
def test_unpack_undoes_the_librarys_pack(shape):
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    got = exercise.unpack_int4(quant.pack(codes, 4))
    assert got.shape == codes.shape, (f"unpacking {shape[-1] // 2} bytes gives {shape[-1]} codes, "
                                      f"got {tuple(got.shape)}")
    assert torch.equal(got.to(torch.uint8), codes), "unpack_int4(pack(codes)) must give the codes back, in order"


def test_extreme_codes_survive_the_round_trip():
    codes = torch.tensor([[0, 15, 15, 0, 1, 14]], dtype=torch.uint8)
    assert exercise.unpack_int4(exercise.pack_int4(codes)).tolist() == codes.tolist(), "0 and 15 must survive"
