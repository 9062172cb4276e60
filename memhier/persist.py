"""Persistent prefix reuse, as LMCache does: the blocks of a prompt's KV cache stay on disk under content
addresses, so a later run, in this process or another, loads them instead of recomputing the prefill.

    root      = sha256(weights digest, model dtype, codec, block_tokens, block layout)   what made the bytes
    address_j = sha256(address_{j-1} || token ids of block j),  address_{-1} = root       a chained hash

An address names everything block j's bytes depend on: the model and how its cache is encoded (the root), and
every token up to the end of the block (the chain; causal attention makes the K/V of token t a function of
tokens 0..t only). Equal addresses mean equal blocks in any process and any run: the hashes are sha256 over bytes
laid out here (little-endian int64 token ids, sorted JSON), never Python's per-process hash().

An entry is one file `<address>.kvp` holding every layer's blob of that block, in the checksummed block format of
memhier/tiers.py (written to a temporary file and renamed, so readers never see half an entry). The directory is
the index: file names are addresses, sizes are bytes, modification times are recency (a use touches the file).
There is no separate index file that a crash or a second process could leave stale: a restarted process lists
the directory and finds what an earlier one stored.

Budget: before an entry is written, the least recently used entries are deleted until it fits. An entry is a
cache of something recomputable, so evicting one costs time, never correctness; a chain is touched tail first,
so its head (shared by the most prompts) is the last to go. A missing, truncated or corrupted entry is a miss:
it is deleted and counted, and its tokens are recomputed from the token ids. Prefill also checks the prompt's
entries past the first miss (`discard_damaged`), so that every damaged one is deleted and rewritten in one run.
"""

import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch

from memhier.blob import BlockLayout
from memhier.tiers import HEADER, BlockIntegrityError, read_block_file, write_block_file

SUFFIX = ".kvp"


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the model's state dict (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return h.hexdigest()


def root_address(model_id: str, dtype: torch.dtype, codec: dict, block_tokens: int, layout: BlockLayout) -> bytes:
    """The start of every chain: a hash of what the block bytes depend on besides the tokens.

    codec: the cache preset's encoding fields, e.g. {"codec": "int4", "group_size": 32, "residual": 128}; layout
    (shapes and dtypes of a block's tensors) adds batch size, KV heads and head_dim.
    """
    described = {"model": model_id, "dtype": str(dtype), "codec": codec, "block_tokens": block_tokens,
                 "layout": repr(layout)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).digest()


def block_addresses(root: bytes, ids: torch.Tensor, block_tokens: int) -> list[str]:
    """One address (hex) per whole block of ids (B, T): block j covers tokens [j*bt, (j+1)*bt) of every row."""
    tokens = ids.detach().cpu().to(torch.int64).numpy().astype("<i8")  # (B, T), little-endian on any machine
    addresses, prev = [], root
    for j in range(ids.shape[1] // block_tokens):
        prev = hashlib.sha256(prev + tokens[:, j * block_tokens : (j + 1) * block_tokens].tobytes()).digest()
        addresses.append(prev.hex())
    return addresses


class PrefixStore:
    """Content-addressed entries (every layer's blob of one block) in `directory`, within `budget` bytes."""

    def __init__(self, directory: str | Path, budget: int):
        self.directory, self.budget = Path(directory), budget
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"memhier.persist_dir={directory} cannot be created ({e}); point it at a writable "
                          f"directory") from e
        self.entries: OrderedDict[str, int] = OrderedDict()  # address -> payload bytes, least recently used first
        for path in sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns):
            self.entries[path.stem] = path.stat().st_size - HEADER.size
        self.used = sum(self.entries.values())
        self.counts = {"hits": 0, "misses": 0, "bad": 0, "written": 0, "evicted": 0, "bytes_read": 0,
                       "bytes_written": 0}

    def path(self, address: str) -> Path:
        return self.directory / f"{address}{SUFFIX}"

    def load(self, address: str, nbytes: int) -> torch.Tensor | None:
        """The entry's payload (nbytes,) uint8, or None on a miss. A file that is missing, truncated, corrupted or
        of the wrong size is deleted and counted as `bad`: its bytes are never returned."""
        blob = self._read(address, nbytes)
        self.counts["hits" if blob is not None else "misses"] += 1
        return blob  # (nbytes,) uint8

    def discard_damaged(self, address: str, nbytes: int) -> None:
        """Read the entry and delete it if it is damaged (counted as `bad`), so that the next save() of these
        tokens replaces it instead of keeping the bad file. Neither a hit nor a miss: the caller computes these
        tokens anyway."""
        self._read(address, nbytes)

    def _read(self, address: str, nbytes: int) -> torch.Tensor | None:
        """The entry's checked payload, or None if its file is missing or damaged (a damaged one is deleted)."""
        try:
            blob = read_block_file(self.path(address), nbytes)  # another process may have written it: just read
        except FileNotFoundError:
            self._forget(address)
            return None
        except BlockIntegrityError:
            self._forget(address)
            self.path(address).unlink(missing_ok=True)  # rewritten when these tokens are next computed
            self.counts["bad"] += 1
            return None
        self.counts["bytes_read"] += HEADER.size + nbytes
        if address not in self.entries:
            self.entries[address] = nbytes
            self.used += nbytes
        return blob

    def save(self, address: str, blobs: list[torch.Tensor]) -> None:
        """Write the entry (the blobs back to back) unless it exists, evicting LRU entries to stay in budget.

        An entry larger than the whole budget is not stored. A full disk raises OSError(ENOSPC) and leaves the
        store consistent: the evicted entries are gone from disk and index alike, the new one from both.
        """
        if address in self.entries or self.path(address).exists():
            return
        data = b"".join(b.cpu().numpy().tobytes() for b in blobs)
        if len(data) > self.budget:
            return
        while self.used + len(data) > self.budget:
            victim = next(iter(self.entries))
            self._forget(victim)
            self.path(victim).unlink(missing_ok=True)
            self.counts["evicted"] += 1
        write_block_file(self.path(address), data)
        self.entries[address] = len(data)
        self.used += len(data)
        self.counts["written"] += 1
        self.counts["bytes_written"] += HEADER.size + len(data)

    def touch(self, addresses: list[str]) -> None:
        """Mark a chain as just used, tail first, so that its head is the most recent (and the last evicted)."""
        now = time.time_ns()
        for i, address in enumerate(reversed(addresses)):
            if address in self.entries:
                self.entries.move_to_end(address)
                try:
                    os.utime(self.path(address), ns=(now + i, now + i))  # recency that outlives the process
                except FileNotFoundError:  # deleted by another process sharing the directory
                    self._forget(address)

    def _forget(self, address: str) -> None:
        self.used -= self.entries.pop(address, 0)

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.used, **self.counts}
