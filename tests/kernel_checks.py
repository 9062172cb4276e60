"""What the Triton kernel tests share: the device they run on, their tolerances, random inputs, the error measure."""

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# fp32 tolerance covers tf32 dots on a GPU (~3e-4); half precision rounds P to 8/11 mantissa bits.
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: one number per tensor, insensitive to the tensor's scale."""
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def make_qkv(B, H, H_kv, Tq, Tk, D, dtype=torch.float32, seed=0):
    """Seeded random q (B, H, Tq, D), k and v (B, H_kv, Tk, D) on DEVICE in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, H_kv, Tk, D, generator=g)
    v = torch.randn(B, H_kv, Tk, D, generator=g)
    return (t.to(DEVICE, dtype) for t in (q, k, v))
