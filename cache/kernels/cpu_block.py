"""A decode step of the transformer's blocks in one C call, each over its layer's block pool: the CPU's fast path for
decoding.

Where it sits: toymodel/model.py's Transformer.forward asks the cache for a decode step's blocks first
(ModelCache.decode_blocks in cache/model_cache.py, which is `decode_in_one_call` below). That runs every block's
`BlockKernel` in one call when the step can run whole in C -- the model packed for decoding on the CPU in float32
(toymodel/decode_layout.py, with its C products and norm), each layer's tokens in a block pool of float32 rows or
per-token integer codes that the C decode kernel reads where they lie, at most MAX_ROWS rows -- and keeps the cache's
bookkeeping in Python: before the call, which pool row each layer's new token goes to; after it, each policy's part
(an eviction when due). Every other case (a prefill, KIVI's and GEAR's residuals, memhier's tiers, MiniCache's pairs,
autograd, an observer of the attention beside an evicting policy, a GPU, more than MAX_ROWS rows) runs the operations
one by one, which stay the reference. cpu_block.c's opening comment says what the call does and why it pays.

The kernel composes the four kernels of the op-by-op path, passed as function pointers: the same products, norm,
attention and quantizer of new tokens, so the two paths differ only in RoPE's and SiLU's last bits, and past
cpu_matmul.MAX_ROWS rows in the products (op by op: the BLAS's; tests/cache/test_cpu_block.py checks logits,
tokens and the cache's blocks against the op-by-op path).
"""

import ctypes
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cache.kernels import cpu_decode, quant_cpu
from cache.quant import QuantTensor
from toymodel.decode_layout import Packed
from toymodel.kernels import cpu_matmul, cpu_norm
from toymodel.kernels.native import BASE_FLAGS, load_library, unavailable_reason

if TYPE_CHECKING:  # annotations only: cache/base.py imports this module
    from cache.base import LayerCache

SOURCE = Path(__file__).with_name("cpu_block.c")
FLAGS = BASE_FLAGS + ("-ffp-contract=off",)  # RoPE's and SiLU's products rounded one by one, as PyTorch rounds them
# The one call takes the C products at any batch, where the op-by-op path hands more than cpu_matmul.MAX_ROWS rows
# to the BLAS. Its products take 0.93-1.00x the BLAS's time there (32-64 rows, python -m bench.matmul), and the call
# saves the per-operation cost: on the 2-core Xeon (bench model, 512 tokens) a step took 0.90-0.92x op by op's time
# at 24-32 rows and the same at 48-64 when the products were 1.1-1.3x slower than the BLAS's. Past 64 rows the
# serving engine's batches are unmeasured: op by op.
MAX_ROWS = 64


class _Kernels(ctypes.Structure):
    """Mirror of `Kernels` in cpu_block.c."""

    _fields_ = [("matmul", ctypes.c_void_p), ("norm", ctypes.c_void_p), ("decode", ctypes.c_void_p),
                ("quantize", ctypes.c_void_p)]


class _Block(ctypes.Structure):
    """Mirror of `Block` in cpu_block.c."""

    _fields_ = [("attn_norm", ctypes.c_void_p), ("qkv", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("mlp_norm", ctypes.c_void_p), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("d_model", ctypes.c_int64), ("d_ff", ctypes.c_int64), ("n_head", ctypes.c_int),
                ("n_kv_head", ctypes.c_int), ("head_dim", ctypes.c_int), ("eps", ctypes.c_float)]


class _Rows(ctypes.Structure):
    """Mirror of `Rows` in cpu_block.c."""

    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("bits", ctypes.c_int), ("group", ctypes.c_int)]


class _Pool(ctypes.Structure):
    """Mirror of `Pool` in cpu_block.c."""

    _fields_ = [("k", _Rows), ("v", _Rows), ("at", ctypes.c_void_p),
                ("paged", ctypes.POINTER(cpu_decode.Paged)), ("max_keys", ctypes.c_int64)]


class _Mass(ctypes.Structure):
    """Mirror of `Mass` in cpu_block.c."""

    _fields_ = [("old", ctypes.c_void_p), ("old_width", ctypes.c_int64), ("out", ctypes.c_void_p),
                ("out_width", ctypes.c_int64), ("squared", ctypes.c_int)]


class _Layer(ctypes.Structure):
    """Mirror of `Layer` in cpu_block.c."""

    _fields_ = [("w", ctypes.POINTER(_Block)), ("pool", ctypes.POINTER(_Pool)), ("weights", ctypes.c_void_p),
                ("mass", ctypes.POINTER(_Mass)), ("k_new", ctypes.c_void_p)]


@functools.cache
def _library() -> ctypes.CDLL:
    """Compile cpu_block.c once per machine (toymodel/kernels/native.py) and load it. Raises RuntimeError."""
    lib = load_library(SOURCE, FLAGS)
    lib.kvlab_decode_layers.restype = ctypes.c_int
    lib.kvlab_decode_layers.argtypes = [ctypes.POINTER(_Kernels), ctypes.POINTER(_Layer), ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int]
    return lib


@functools.cache
def _kernels() -> _Kernels:
    """The op-by-op path's kernels, as pointers into their libraries (each compiled with its own flags, at first
    use). Raises RuntimeError where one cannot be built."""
    functions = (cpu_matmul.library().kvlab_cpu_matmul, cpu_norm.library().kvlab_cpu_rms_norm,
                 cpu_decode.library().kvlab_cpu_decode, quant_cpu.library().kvlab_quantize_per_token)
    return _Kernels(*(ctypes.cast(fn, ctypes.c_void_p).value for fn in functions))


@functools.cache  # a failed build is not tried again at every step
def cpu_block_available() -> str | None:
    """None when the kernel and the four it calls can run here, else the reason (no compiler, a failed compile)."""
    return unavailable_reason(_library) or unavailable_reason(_kernels)


def decode_in_one_call(layers: list["LayerCache"], blocks: list[torch.nn.Module], x: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor | None:
    """A decode step of every block over its layer's cache (LayerCache) in one call: x (B, 1, d) -> x after the
    last block, each step's k and v stored in its layer's blocks and each policy's part done as its attend() would
    (the state of the new keys, the weights it reads, an eviction when due). None where the call does not serve a
    layer, then every block runs op by op: another kernel than the C one over blocks of float32 rows or per-token
    codes where they lie, a model not packed with the C products and norm, more than MAX_ROWS rows, autograd, or an
    observer of the attention (the serving engine's KV-Compress scores) beside a policy that evicts. The layers'
    caches are independent, so each policy's part runs after the call: its choice is the one it makes op by op."""
    if x.shape[0] > MAX_ROWS or x.dtype != torch.float32 or not x.is_cpu or torch.is_grad_enabled():
        return None
    kernels = [_kernel_for(layer, block) for layer, block in zip(layers, blocks)]
    if any(kernel is None for kernel in kernels):
        return None
    steps = [_LayerStep(layer, kernel, x.shape[0]) for layer, kernel in zip(layers, kernels)]  # pool rows taken
    x = run_layers([step.call for step in steps], x, cos, sin)
    for step in steps:
        step.finish()
    return x


def _kernel_for(layer: "LayerCache", block: torch.nn.Module) -> "BlockKernel | None":
    """The layer's kernel for `block` (built at its first decode step, or again after the model was packed again),
    or None where the call does not serve the layer."""
    if not block.one_call or (layer.observe is not None and layer.policy.reads != "nothing"):
        return None
    kernel = layer.block_kernel
    if kernel is None or not kernel.serves(block):
        if layer.kernel is not cpu_decode.cpu_decode_paged or not layer.store.token_rows():
            return None
        kernel = layer.block_kernel = BlockKernel.of(block)
    return kernel


class _LayerStep:
    """A layer's part of a decode step in one call: what its policy or observer asks of the kernel, made before the
    call (the step's pool rows taken), and what they do with the answers after it."""

    def __init__(self, layer: "LayerCache", kernel: "BlockKernel", B: int):
        store, self.layer = layer.store, layer
        self.due = None if layer.policy.reads == "nothing" else store.due(layer.policy.budget, 1)  # before the step
        at = store.decode_rows()  # (B * H_kv,): where each head's new token goes, its blocks allocated
        tables, lengths = store.read_view()
        pool = (B, store.pool.k, store.pool.v, at, tables, lengths)
        self.squares_into = getattr(layer.observe, "squares_into", None)
        if self.squares_into is not None:  # the serving engine's running KV-Compress scores: the kernel adds to them
            self.call = kernel.prepare(*pool, squares=self.squares_into(int(lengths.max())))
        elif layer.observe is not None:  # another observer: the weights, handed out as LayerCache._attend_paged does
            self.call = kernel.prepare(*pool, weights=True)
        elif layer.policy.sums_attention:  # H2O: the kernel adds the step's attention to each key's total
            mass = layer.state.get("mass")  # None before the layer's first step
            self.call = kernel.prepare(*pool, mass=torch.zeros(B, kernel.n_kv_head, 0) if mass is None else mass)
        else:
            self.call = kernel.prepare(*pool, weights=self.due is not None and layer.reads_weights(self.due))

    def finish(self) -> None:
        """After the call: the observer's or the policy's part of the step, with what the kernel handed out."""
        layer, call, due = self.layer, self.call, self.due
        if layer.observe is not None:
            if self.squares_into is None:
                layer.observe(None, layer.store, call.weights)
        elif layer.policy.sums_attention:
            layer.state["mass"] = call.mass
            if due.any():
                layer.evict(None, None, due, observed=True)
        elif due is not None and (layer.every_step or due.any()):
            layer.after_decode(call.k_new, call.weights, due)


def _pool_rows(pool: torch.Tensor | QuantTensor, name: str) -> _Rows:
    """The C description of K's or V's blocks (n_blocks, 1, block_tokens, D), which C writes a token's row into:
    contiguous float32, or per-token codes (cache/quant.py). ValueError for anything else."""
    if isinstance(pool, torch.Tensor):
        if pool.dtype != torch.float32 or not pool.is_contiguous():
            raise ValueError(f"cpu_block: {name} must be contiguous float32 blocks, got {pool.dtype}")
        return _Rows(pool.data_ptr(), None, None, 0, 0)
    parts = (pool.codes, pool.scale, pool.zero)
    if pool.axis != "token" or not all(t.is_contiguous() for t in parts):
        raise ValueError(f"cpu_block: {name} must be contiguous per-token codes, got axis={pool.axis!r}")
    return _Rows(*(t.data_ptr() for t in parts), pool.bits, pool.group_size)


class BlockKernel:
    """A decode step of `block` (a toymodel.model.Block packed for decoding) over one layer's block pool, in one
    call. `BlockKernel.of(block)` is None where the block is not packed for it."""

    def __init__(self, block: torch.nn.Module):
        attn, mlp = block.attn, block.mlp
        self.block, self.qkv = block, attn.project_qkv
        self.products = (attn.project_qkv.w_t, attn.project_out.w_t, mlp.project_gate_up.w_t, mlp.project_down.w_t)
        self.norms = (block.attn_norm.weight.detach(), block.mlp_norm.weight.detach())
        self.n_head, self.n_kv_head, self.head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
        self.d_model = d_model = self.products[0].shape[0]
        d_ff = self.products[3].shape[0]
        self.work_per_row = 2 * d_model + (self.n_head + 2 * self.n_kv_head + 2 * self.n_head) * self.head_dim \
            + 3 * d_ff  # floats of scratch per row (cpu_block.c)
        ptr = [t.data_ptr() for t in (self.norms[0], self.products[0], self.products[1], self.norms[1],
                                      self.products[2], self.products[3])]
        self.weights = _Block(*ptr, d_model, d_ff, self.n_head, self.n_kv_head, self.head_dim, block.attn_norm.eps)
        self.pool_described: tuple = ()  # (k_pool, v_pool, tables, lengths, their C description, what C reads)
        self.work = torch.empty(0)  # C's scratch, work_per_row floats per row, kept from call to call

    @staticmethod
    def of(block: torch.nn.Module) -> "BlockKernel | None":
        """The kernel for `block`, or None unless pack_for_decode gave it the C products and norm (float32, CPU)
        and its norms one eps."""
        packed = (block.attn.project_qkv, block.attn.project_out, block.mlp.project_gate_up, block.mlp.project_down)
        if not all(isinstance(p, Packed) and p.matmul is cpu_matmul.decode_matmul for p in packed):
            return None
        norms = (block.attn_norm, block.mlp_norm)
        if not all(n.normalize is cpu_norm.fast_rms_norm and n.weight.is_contiguous() for n in norms):
            return None
        if norms[0].eps != norms[1].eps or cpu_block_available() is not None:
            return None
        return BlockKernel(block)

    def serves(self, block: torch.nn.Module) -> bool:
        """Whether this kernel still reads `block`'s weights (packing again makes new ones)."""
        return self.block is block and self.qkv is block.attn.project_qkv

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor | QuantTensor,
                 v_pool: torch.Tensor | QuantTensor, at: np.ndarray, tables: np.ndarray, lengths: np.ndarray,
                 weights: bool = False, mass: torch.Tensor | None = None, squares: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The block alone: x (B, 1, d) -> x after the block (its output added), the rotated new keys (B, H_kv, 1,
        D), the softmax weights (B, H, 1, L) with `weights` (else None), H2O's totals with `mass` (else None): the
        arguments as `prepare` takes them, after cos, sin (B, ..., D/2), the rows' angles."""
        call = self.prepare(x.shape[0], k_pool, v_pool, at, tables, lengths, weights, mass, squares)
        return run_layers([call], x, cos, sin), call.k_new, call.weights, call.mass

    def prepare(self, B: int, k_pool: torch.Tensor | QuantTensor, v_pool: torch.Tensor | QuantTensor,
                at: np.ndarray, tables: np.ndarray, lengths: np.ndarray, weights: bool = False,
                mass: torch.Tensor | None = None, squares: torch.Tensor | None = None) -> "LayerCall":
        """The block's part of a decode step of B rows, for run_layers: the C description of its arguments and the
        tensors C writes. k_pool, v_pool: the layer's blocks (n_blocks, 1, block_tokens, D), float32 or per-token
        codes; at (B * H_kv,) int64 the pool row of each head's new token; tables (B, H_kv, max_blocks) and lengths
        (B, H_kv) int32, the new token counted. `weights`: hand out the softmax weights (B, H, 1, L). `mass` (H2O's
        totals before the step, (B, H_kv, n) float32, zero past each head's length, n = 0 at the first step): hand
        out the totals with this step's attention added, (B, H_kv, L). `squares` (B, H_kv, n >= L) float32,
        contiguous, zero past each head's length (KV-Compress's running scores): the step's squared weights, summed
        over each KV head's queries, are added to it in place. C reads them all as raw memory: ValueError for
        another dtype, shape or layout."""
        H_kv, D, f32 = self.n_kv_head, self.head_dim, torch.float32
        if (at.dtype != np.int64 or not at.flags.c_contiguous or at.shape != (B * H_kv,)
                or tables.shape[:2] != (B, H_kv) or lengths.shape != (B, H_kv)):
            raise ValueError(f"cpu_block: at (B * H_kv,) int64, tables (B, H_kv, max_blocks) and lengths (B, H_kv) "
                             f"for B={B}, H_kv={H_kv} (C reads them as raw memory), got at {at.dtype}{at.shape}, "
                             f"tables {tables.shape}, lengths {lengths.shape}")
        L = int(lengths.max())
        if mass is not None and (mass.dtype != f32 or mass.shape[:2] != (B, H_kv) or mass.shape[2] > L):
            raise ValueError(f"cpu_block: mass must be float32 (B={B}, H_kv={H_kv}, n <= {L} tokens), got "
                             f"{mass.dtype}{tuple(mass.shape)}")
        if squares is not None and (squares.dtype != f32 or squares.shape[:2] != (B, H_kv) or squares.shape[2] < L
                                    or not squares.is_contiguous() or mass is not None):
            raise ValueError(f"cpu_block: squares must be contiguous float32 (B={B}, H_kv={H_kv}, n >= {L} tokens) "
                             f"(C adds to it in place), and no mass beside it; got {squares.dtype}"
                             f"{tuple(squares.shape)}{', and a mass' if mass is not None else ''}")
        call = LayerCall(self, torch.empty(B, H_kv, 1, D, dtype=f32))
        summed = mass is not None or squares is not None
        w = torch.empty(B, self.n_head, 1, L, dtype=f32) if weights or summed else None  # to sum: scratch
        totals = None
        if mass is not None:
            old = mass.contiguous()
            call.mass = torch.empty(B, H_kv, L, dtype=f32)
            totals = _Mass(old.data_ptr(), old.shape[2], call.mass.data_ptr(), L, 0)
        elif squares is not None:  # in place
            totals = _Mass(squares.data_ptr(), squares.shape[2], squares.data_ptr(), squares.shape[2], 1)
        pool = self._describe(k_pool, v_pool, tables, lengths)
        pool.at, pool.max_keys = at.ctypes.data, L
        call.weights, call.read = (w if weights else None), (at, w, totals, mass)  # C reads these in the call
        call.struct = _Layer(ctypes.pointer(self.weights), ctypes.pointer(pool), None if w is None else w.data_ptr(),
                             None if totals is None else ctypes.pointer(totals), call.k_new.data_ptr())
        return call

    def scratch(self, n: int) -> torch.Tensor:
        """At least n floats of scratch for C (work_per_row per row), kept from call to call."""
        if self.work.numel() < n:
            self.work = torch.empty(n, dtype=torch.float32)
        return self.work

    def _describe(self, k_pool: torch.Tensor | QuantTensor, v_pool: torch.Tensor | QuantTensor,
                  tables: np.ndarray, lengths: np.ndarray) -> _Pool:
        """The C description of the layer's K and V blocks (where C writes a token's row, and the Segment it reads)
        and of the block tables and lengths it reads them by, built once per set of these four: they are the same
        objects from step to step until the pool grows or the batch changes (the lengths count up in place), and
        holding them here keeps their memory, and so the pointers described, valid. The caller sets the step's
        `at` and `max_keys`. ValueError for tables or lengths that are not contiguous int32."""
        described = self.pool_described
        if not described or any(a is not b for a, b in zip(described, (k_pool, v_pool, tables, lengths))):
            for name, a in (("tables", tables), ("lengths", lengths)):
                if a.dtype != np.int32 or not a.flags.c_contiguous:
                    raise ValueError(f"cpu_block: {name} must be a contiguous int32 array (C reads it as raw memory), "
                                     f"got {a.dtype}{'' if a.flags.c_contiguous else ', not contiguous'}")
            rows = _pool_rows(k_pool, "k_pool"), _pool_rows(v_pool, "v_pool")  # refuses a copy: C writes in place
            keep: list[torch.Tensor] = []  # what C reads stays alive as long as the description
            segment = cpu_decode.Segment(cpu_decode.payload(k_pool, "k_pool", keep)[0],
                                         cpu_decode.payload(v_pool, "v_pool", keep)[0], k_pool.shape[2])
            paged = cpu_decode.Paged(ctypes.pointer(segment), tables.ctypes.data, lengths.ctypes.data,
                                     tables.shape[2], None, None)
            pool = _Pool(*rows, None, ctypes.pointer(paged), 0)  # the pointers hold the structures they point to
            self.pool_described = (k_pool, v_pool, tables, lengths, pool, keep)
        return self.pool_described[4]


class LayerCall:
    """A block's part of a decode step (BlockKernel.prepare): its C description `struct`, the tensors C writes that
    the caller reads after run_layers -- the rotated new keys k_new (B, H_kv, 1, D), the softmax weights (B, H, 1,
    L) or None, H2O's new totals `mass` (B, H_kv, L) or None -- and `read`, what C reads, alive until then."""

    def __init__(self, kernel: BlockKernel, k_new: torch.Tensor):
        self.kernel, self.k_new = kernel, k_new
        self.weights: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None
        self.read: tuple = ()
        self.struct: _Layer | None = None


def run_layers(calls: list[LayerCall], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Run the blocks `calls` describe one after another in one C call: x (B, 1, d) -> x after the last one, at
    the rows' angles cos, sin (B, ..., D/2)."""
    first, B, f32 = calls[0].kernel, x.shape[0], torch.float32
    if x.shape != (B, 1, first.d_model) or x.dtype != f32 or cos.dtype != f32 or sin.dtype != f32:
        raise ValueError(f"cpu_block: x must be float32 (B, 1, {first.d_model}) and cos, sin float32, got x "
                         f"{x.dtype}{tuple(x.shape)}, cos {cos.dtype}, sin {sin.dtype}")
    out = x.reshape(B, -1).clone()  # (B, d): the residual stream, updated in place by every block
    cos, sin = cos.reshape(B, -1).contiguous(), sin.reshape(B, -1).contiguous()  # (B, D/2) each
    work = first.scratch(B * max(call.kernel.work_per_row for call in calls))
    layers = (_Layer * len(calls))(*(call.struct for call in calls))
    if _library().kvlab_decode_layers(ctypes.byref(_kernels()), layers, len(calls), out.data_ptr(), B, cos.data_ptr(),
                                      sin.data_ptr(), work.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError(f"cpu_block: the attention's scratch ({first.n_head // first.n_kv_head} x the longest "
                          f"head's tokens, floats per thread) could not be allocated")
    return out.view(B, 1, -1)
