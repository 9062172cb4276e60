"""The weight layout for decoding: every product of a decode step reads its weights front to back, once.

Decoding one token is a chain of matrix-vector products, and their cost is reading the weights from memory. Two
changes to the layout make that read faster on the CPU (`python -m bench.decode --compare-layouts` measures them):

  - every weight stored transposed, (d_in, d_out) row-major, so x @ W^T is a plain row-major product that the
    BLAS (or our C kernel) streams through;
  - the matrices that read the same input packed side by side (q, k, v; gate, up), so one product replaces two or
    three.

`pack_for_decode(model)` does both, once, before inference, and picks the product itself: on a CPU in float32, the
few-row products of a decode step go to a small C kernel that reads each weight matrix front to back with every core
(toymodel/kernels/cpu_matmul.py); elsewhere, torch.matmul. It swaps the model's `project_*` callables
(toymodel/model.py) for `Packed` ones, and on a CPU in float32 each RMSNorm's `normalize` for one call of a C kernel
(toymodel/kernels/cpu_norm.py) in place of six PyTorch operations. With those kernels, a decode step's block may run
whole in one call where its layer's cache lies in a block pool of float32 rows or per-token codes (the cache
decides: cache/kernels/cpu_block.py, which calls the same kernels). The parameters keep their names, shapes and
values -- each becomes a view of its columns in the packed matrix -- so checkpoints, the state dict and the logits
are unchanged.

Call it after loading the weights and moving the model (.to() copies parameters apart and would undo the
packing); it is for inference, not training.
"""

import torch
import torch.nn as nn

from toymodel.kernels.cpu_matmul import Matmul, decode_matmul, matmul_for
from toymodel.kernels.cpu_norm import fast_rms_norm, norm_for
from toymodel.model import RMSNorm, rms_norm


@torch.no_grad()
def pack_linears(*linears: nn.Linear) -> torch.Tensor:
    """One (d_in, sum of d_out) row-major matrix holding the transposed weights of linears that share an input.

    Each linear's weight becomes a (d_out, d_in) view of its columns: values and shape unchanged, one storage, so
    nn.Linear and x @ packed always agree (nothing can go stale) and no memory is added.
    """
    packed = torch.cat([lin.weight for lin in linears]).t().contiguous()  # (d_in, sum d_out)
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(packed[:, start : start + n].t(), lin.weight.requires_grad)  # (d_out, d_in) view
        start += n
    return packed


class Packed:
    """x -> the outputs of the packed linears, from one product by `matmul` (one output for one linear)."""

    def __init__(self, linears: tuple[nn.Linear, ...], matmul: Matmul):
        self.w_t = pack_linears(*linears)  # (d_in, sum d_out)
        self.sizes = [lin.out_features for lin in linears]
        self.matmul = matmul

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        y = self.matmul(x, self.w_t)  # (..., sum d_out)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


def pack_for_decode(model: nn.Module, cpu_kernel: bool = True, cpu_norm: bool = True,
                    one_call: bool = True) -> nn.Module:
    """Lay `model`'s (a toymodel.model.Transformer) weights out for decoding, in place, and return it.

    cpu_kernel=False keeps torch.matmul on the CPU too, cpu_norm=False PyTorch's RMSNorm, one_call=False every
    decode step's blocks op by op (`python -m bench.decode --compare-layouts` times each against the default).
    """
    weight = model.lm_head.weight
    matmul = matmul_for(weight.device, weight.dtype) if cpu_kernel else torch.matmul
    normalize = norm_for(weight.device, weight.dtype) if cpu_norm else rms_norm
    for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):
        norm.normalize = normalize
    for block in model.layers:
        block.one_call = one_call and matmul is decode_matmul and normalize is fast_rms_norm  # the C kernels only
        attn, mlp = block.attn, block.mlp
        attn.project_qkv = Packed((attn.q_proj, attn.k_proj, attn.v_proj), matmul)
        attn.project_out = Packed((attn.o_proj,), matmul)
        mlp.project_gate_up = Packed((mlp.gate_proj, mlp.up_proj), matmul)
        mlp.project_down = Packed((mlp.down_proj,), matmul)
    model.project_logits = Packed((model.lm_head,), matmul)  # the tied matrix: the embedding reads rows of it
    model.embed_tokens.weight = model.lm_head.weight
    return model
