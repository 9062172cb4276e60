"""The places an encoded block can live: a budgeted memory tier (the device, or pinned host memory) and a spill
directory on disk. A tier holds opaque uint8 blobs (memhier/blob.py) by key and never decodes them.

Every tier offers the same small interface, so the TieredStore (memhier/store.py) moves blocks without asking
which tier it talks to:

    key in tier      tier.used, tier.budget (bytes)      tier.lru(exclude) -> the least recently used key
    tier.insert(key, blob)     tier.read(key) -> blob     tier.touch(key)     tier.remove(key)

(`Tier` holds what they share; memhier/frames.py's FrameTier, device frames of the block pool, is one too.)

Recency is the order of an OrderedDict: insert and touch move a key to the end, so the first key is the LRU one.

Disk blocks are files `<key>.kvb`: a header (magic, payload length, xxh3-64 checksum of the payload) then the
payload (`write_block_file` / `read_block_file`, shared with the persistent prefix store of memhier/persist.py).
Writes go to a uniquely named temporary file renamed into place (atomic on POSIX), so a crash never leaves a half
block under a block's name, and two processes sharing a directory never see one. A read is three system calls
(open, one scatter read straight into the returned tensor, close) and one checksum pass; it checks the header,
the length and the checksum: a truncated, overlong, corrupted or deleted file raises an error naming the file, and
its bytes are never used. A non-persistent run spills into a fresh directory of its own, removed by close() and,
should close() never run, at interpreter exit.
"""

import atexit
import errno
import os
import shutil
import struct
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Collection

import numpy as np
import torch
import xxhash

Key = tuple[int, ...]  # what a tier files a blob under, e.g. (17,): group 17 of memhier/frames.py

MAGIC = b"KVLBLK02"  # 01 carried a sha256; such files now fail the header check (a prefix entry is recomputed)
HEADER = struct.Struct("<8sQQ")  # magic, payload length in bytes, checksum(payload)


def checksum(data) -> int:
    """xxh3-64 of a buffer (bytes, bytearray, a numpy array): the integrity check of every block file.

    It guards against accidents (a flipped bit, a torn or truncated write, a stray edit): any such change makes a
    match a 2**-64 chance. It is not a defence against someone who can write the spill directory, but neither is an
    unkeyed sha256 stored beside the data (they would rewrite it too), which costs an order of magnitude more time
    per byte (on the two-core machine of the README, a large share of each block's read time).
    """
    return xxhash.xxh3_64_intdigest(data)


class BlockIntegrityError(RuntimeError):
    """A spill block on disk is not what was written (truncated or corrupted): its bytes must not be used."""


class Tier:
    """What every tier shares: `name`, `budget` and `used` bytes, and `blocks`, its keys in recency order (an
    OrderedDict, least recently used first; what a key maps to is the tier's own business)."""

    def __init__(self, name: str, budget: int):
        self.name, self.budget = name, budget
        self.blocks: OrderedDict = OrderedDict()
        self.used = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def lru(self, exclude: Collection[Key] = ()) -> Key | None:
        """The least recently used key not in `exclude`, or None."""
        return next((k for k in self.blocks if k not in exclude), None)

    def touch(self, key: Key) -> None:
        self.blocks.move_to_end(key)


class MemoryTier(Tier):
    """Blobs held in memory on `device` within `budget` bytes; `pin` keeps host copies page-locked (fast copies
    to and from a GPU). On a CPU-only machine the "device" tier is this class with device=cpu: a budget, no GPU.
    `blocks`: key -> (nbytes,) uint8."""

    def __init__(self, name: str, budget: int, device: torch.device, pin: bool = False):
        super().__init__(name, budget)
        self.device, self.pin = device, pin

    def insert(self, key: Key, blob: torch.Tensor) -> None:
        """Hold a copy of blob (nbytes,) uint8 here (no copy when it already lives on this device, unpinned)."""
        if self.pin:
            held = torch.empty(blob.shape, dtype=torch.uint8, pin_memory=True).copy_(blob)
        else:
            held = blob.to(self.device)
        self.blocks[key] = held
        self.used += held.numel()

    def read(self, key: Key) -> torch.Tensor:
        return self.blocks[key]

    def remove(self, key: Key) -> None:
        self.used -= self.blocks.pop(key).numel()

    def close(self) -> None:
        self.blocks.clear()
        self.used = 0


def write_bytes(f: BinaryIO, data: bytes) -> None:
    """Write data to an open file (a seam the tests use to simulate a full disk)."""
    f.write(data)


def write_block_file(path: Path, data: bytes) -> None:
    """Write header + data to `path` atomically: a uniquely named temporary file, then a rename. A full disk
    raises OSError(ENOSPC) naming the directory, and leaves neither a temporary file nor `path` changed."""
    header = HEADER.pack(MAGIC, len(data), checksum(data))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")  # unique: processes share
    try:
        with os.fdopen(fd, "wb") as f:
            write_bytes(f, header)
            write_bytes(f, data)
        os.replace(tmp, path)  # atomic: readers see the old state or the whole block, never half of it
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"memhier: no space left on the device holding {path.parent} while writing "
                          f"a block of {len(data)} bytes; free disk space, point memhier.spill_dir / "
                          f"memhier.persist_dir at a larger disk, or lower the disk budgets") from e
        raise


def read_block_file(path: Path, expected: int) -> torch.Tensor:
    """The payload (expected,) uint8 of a block file, after checking its header, length and checksum.

    One scatter read (readv) fills three buffers in turn: the header, the payload (the memory of the tensor that
    is returned, so the kernel's copy out of the page cache is the only one) and one spare byte, which only a file
    longer than its header says can reach.

    Raises FileNotFoundError for a missing file and BlockIntegrityError for a truncated, overlong or corrupted
    one; a bad payload is never returned.
    """
    header, payload, spare = bytearray(HEADER.size), np.empty(expected, dtype=np.uint8), bytearray(1)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"memhier: block file {path} is missing (deleted while the run needed it); "
                                f"keep memhier.spill_dir and memhier.persist_dir away from cleanup jobs") from e
    try:
        got = os.readv(fd, [header, payload, spare])  # bytes read; fewer than asked only at the end of the file
    finally:
        os.close(fd)
    if got < HEADER.size:
        raise BlockIntegrityError(f"memhier: block file {path} is truncated ({got} bytes, shorter than its "
                                  f"{HEADER.size}-byte header); the block is unusable")
    magic, length, digest = HEADER.unpack(header)
    if magic != MAGIC or length != expected:
        raise BlockIntegrityError(f"memhier: block file {path} has a damaged header (magic {magic!r}, length "
                                  f"{length}, expected {MAGIC!r} and {expected}); the block is unusable")
    if got != HEADER.size + length:
        state = "truncated" if got < HEADER.size + length else "longer than its header says"
        raise BlockIntegrityError(f"memhier: block file {path} is {state} ({got - HEADER.size} payload bytes "
                                  f"where the header says {length}); the block is unusable")
    if checksum(payload) != digest:
        raise BlockIntegrityError(f"memhier: block file {path} fails its checksum (corrupted on disk); the block "
                                  f"is unusable")
    return torch.from_numpy(payload)  # (expected,) uint8, sharing the memory the kernel wrote into


class DiskTier(Tier):
    """Blobs as checksummed files in a fresh directory under `spill_dir`, within `budget` bytes of payload.
    `blocks`: key -> (its file, payload bytes)."""

    def __init__(self, budget: int, spill_dir: str | Path):
        super().__init__("disk", budget)
        root = Path(spill_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"memhier.spill_dir={spill_dir} cannot be created ({e}); point it at a writable "
                          f"directory") from e
        self.directory = Path(tempfile.mkdtemp(prefix="kvlab-spill-", dir=root))  # this run's own directory
        self.bytes_written = self.bytes_read = 0
        self.read_seconds = 0.0  # wall time inside read(): open, read, close, checksum (the tier's bandwidth)
        atexit.register(self.close)  # spill files of a non-persistent run never outlive the process

    def path(self, key: Key) -> Path:
        """The file of `key`, e.g. <directory>/17.kvb (group 17). Named once, at insert, and kept with the block:
        building a Path costs a measurable share of reading a small block."""
        return self.directory / ("-".join(str(i) for i in key) + ".kvb")

    def insert(self, key: Key, blob: torch.Tensor) -> None:
        """Write blob (nbytes,) uint8 to <key>.kvb atomically. A full disk raises OSError(ENOSPC) and leaves the
        tier unchanged."""
        data, path = blob.cpu().numpy().tobytes(), self.path(key)
        write_block_file(path, data)
        self.blocks[key] = path, len(data)
        self.used += len(data)
        self.bytes_written += HEADER.size + len(data)

    def read(self, key: Key) -> torch.Tensor:
        """The blob of `key`, after checking its file (see read_block_file); a bad block raises, never returns."""
        start = time.perf_counter()
        blob = read_block_file(*self.blocks[key])  # (nbytes,) uint8
        self.read_seconds += time.perf_counter() - start
        self.bytes_read += HEADER.size + blob.numel()
        return blob

    def remove(self, key: Key) -> None:
        path, nbytes = self.blocks.pop(key)
        self.used -= nbytes
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Delete this run's spill directory and forget its blocks (idempotent)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.blocks.clear()
        self.used = 0
        atexit.unregister(self.close)
