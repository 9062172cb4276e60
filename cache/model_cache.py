"""The cache the model talks to: a ModelCache holds one LayerCache per layer (cache/base.py) and where each row of
the batch stands (`Rows`), and answers Transformer.forward's two questions, the RoPE positions of a step's new tokens
and, after the layers ran, that they were seen. Rows join and leave a batch here (the serving engine), and the
cache's bytes are counted here for the reports."""

import numpy as np
import torch

from cache.base import LayerCache
from cache.kernels.cpu_block import decode_in_one_call


class Rows:
    """Where the rows of a batch stand, shared by a ModelCache and its paged stores (cache/blocks.py): `seen` (B,)
    the tokens each row has seen, `new` (B,) the real tokens each adds this step (set by ModelCache.positions)."""

    def __init__(self, batch_size: int, device: torch.device):
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.new = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)


class ModelCache:
    """One LayerCache per layer, and `pos` (B,): the tokens each row has seen, the RoPE offset of its next token.

    A ragged step (rows adding different numbers of tokens, or standing at different positions) needs every
    layer's store to keep per-row lengths (`Store.ragged_rows`); the others take rectangular batches only.
    """

    def __init__(self, layers: list[LayerCache], batch_size: int, n_kv_head: int, head_dim: int, device: torch.device,
                 rows: Rows | None = None):
        self.layers = layers
        self.batch_size, self.n_kv_head, self.head_dim, self.device = batch_size, n_kv_head, head_dim, device
        self.rows = Rows(batch_size, device) if rows is None else rows  # the paged stores' rows, if any
        self.ragged_rows = all(layer.store.ragged_rows for layer in layers)  # rows may differ in length

    @property
    def pos(self) -> torch.Tensor:
        return self.rows.seen  # (B,)

    @property
    def new(self) -> torch.Tensor:
        return self.rows.new  # (B,): this step's real tokens per row

    def positions(self, T: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) RoPE positions of the next T tokens of each row, `lengths` (B,) of them real (None: all T);
        every layer runs the same policy, so layer 0 answers. Raises ValueError for lengths outside [1, T], or a
        ragged step that a layer's store cannot hold."""
        if lengths is None:
            self.rows.new = torch.full_like(self.pos, T)
        else:
            self.rows.new = lengths.to(device=self.device, dtype=torch.long)
            if self.new.shape != self.pos.shape or not bool(((self.new >= 1) & (self.new <= T)).all()):
                raise ValueError(f"lengths must be ({self.batch_size},) counts in [1, T={T}] (each row's real "
                                 f"tokens), got {lengths.tolist()}")
        if not self.ragged_rows and bool((self.new != self.new[0]).any() | (self.pos != self.pos[0]).any()):
            raise ValueError("this cache keeps one length for the whole batch, so its rows must add the same number "
                             "of tokens at the same positions; pad the prompts to one length, or use a preset other "
                             "than MiniCache's")
        return self.layers[0].positions(self.pos, T)

    def decode_blocks(self, blocks: list[torch.nn.Module], x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor | None:
        """A decode step's blocks (toymodel.model.Block) in one C call over the layers, x (B, 1, d) -> x after the
        last, or None where that does not serve and the blocks run op by op (cache/kernels/cpu_block.py)."""
        return decode_in_one_call(self.layers, blocks, x, cos, sin)

    def advance(self) -> None:
        """Count the last step's new tokens as seen."""
        self.rows.seen += self.rows.new

    def extend(self, other: "ModelCache") -> None:
        """Append `other`'s rows after this cache's own (one block pool, one policy: its per-token state comes too):
        sequences prefilled apart join the serving engine's running batch. Raises ValueError for other caches."""
        self._check_rows_move(other)
        for mine, theirs in zip(self.layers, other.layers):
            mine.state = mine.store.extend(theirs.store, mine.state, theirs.state)
        self.rows.seen = torch.cat([self.rows.seen, other.rows.seen])  # (B + B_other,)
        self.rows.new = torch.cat([self.rows.new, other.rows.new])
        self.batch_size += other.batch_size

    def drop_rows(self, keep: list[bool]) -> None:
        """Free every block of the rows whose `keep` entry is False; the others close ranks, in order."""
        self._check_rows_move(self)
        mask = np.asarray(keep, dtype=bool)  # (B,)
        for layer in self.layers:
            layer.state = layer.store.drop_rows(mask, layer.state)
        index = torch.from_numpy(mask).to(self.device)
        self.rows.seen, self.rows.new = self.rows.seen[index], self.rows.new[index]
        self.batch_size = int(mask.sum())

    def row_blocks(self) -> tuple[list[int], list[int]]:
        """Per row, summed over the layers of a block-pool cache: the blocks it holds, and the blocks its next
        decode step takes (the serving engine's scheduler counts with them)."""
        held, nxt = zip(*(layer.store.row_blocks() for layer in self.layers))
        return np.sum(held, axis=0).tolist(), np.sum(nxt, axis=0).tolist()

    def _check_rows_move(self, other: "ModelCache") -> None:
        """Rows move between caches only in the block pool, and only under the same policy (its knobs included)."""
        if not all(layer.store.paged for layer in self.layers + other.layers):
            raise ValueError("rows join and leave a batch only in the block pool (every preset but MiniCache's)")
        if (mine := self.layers[0].policy) != (theirs := other.layers[0].policy):
            raise ValueError(f"rows join a batch only under its policy, {mine}, not {theirs}")

    def skip(self, n: int) -> None:
        """Count n tokens per row as seen without running them (memhier loads their blocks from a prefix store)."""
        self.rows.seen += n

    def tokens_seen(self) -> int:
        """Tokens seen, summed over the rows."""
        return int(self.pos.sum())

    def memory_bytes(self) -> dict[str, int]:
        """Real storage bytes of every layer, summed per tier: {"device": n}."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for tier, n in layer.memory_bytes().items():
                total[tier] = total.get(tier, 0) + n
        return total

    def total_bytes(self) -> int:
        return sum(self.memory_bytes().values())

    def full_cache_bytes(self, bytes_per_element: int = 2) -> int:
        """What a full cache would hold for the tokens seen: sum(pos) * 2 (K, V) * n_layer * H_kv * D * bytes (fp16)."""
        return self.tokens_seen() * 2 * len(self.layers) * self.n_kv_head * self.head_dim * bytes_per_element

    def cached_elements(self) -> int:
        """K and V numbers cached: tokens stored (over layers, batch, KV heads) * 2 * D."""
        return sum(layer.tokens_stored() for layer in self.layers) * 2 * self.head_dim

    def figures(self) -> dict[str, float]:
        """The numbers a report prints: bytes held, a full fp16 cache's bytes, their ratio, bits per element."""
        held, full, elements = self.total_bytes(), self.full_cache_bytes(), self.cached_elements()
        figures = {
            "tokens_seen": self.tokens_seen() // self.batch_size,  # per sequence (a ragged batch: the mean)
            "tokens_cached": sum(len(layer) for layer in self.layers) / len(self.layers),
            "kv_bytes": held,
            "kv_bytes_full_fp16": full,
            "compression_ratio": full / held if held else float("nan"),
            "bits_per_element": 8 * held / elements if elements else float("nan"),
        }
        if self.layers[0].store.paged:  # the pool's free blocks too: capacity held for reuse, not counted above
            pool = self.layers[0].store.pool
            figures["kv_pool_bytes"] = pool.capacity_bytes()
        return figures
