"""Spill blocks on disk: a flipped byte, a truncated or overlong file, a damaged header or a deleted file is
detected on read and reported, never used; writes are atomic; a full disk (ENOSPC) gives a clear error and leaves
the store consistent; a non-persistent run's spill directory is removed at close and at interpreter exit."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memhier.tiers
from memhier.store import TieredStore
from memhier.tiers import HEADER, BlockIntegrityError, DiskTier, MemoryTier, read_block_file, write_block_file


def blob(seed: int, n: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)  # (n,) random bytes


def spilled_store(tmp_path) -> tuple[TieredStore, DiskTier]:
    """A store whose blocks (0, 0) and (0, 1) live on disk, (0, 2) on the device tier."""
    disk = DiskTier(10_000, tmp_path)
    store = TieredStore([MemoryTier("device", 100, torch.device("cpu")), disk])
    for i in range(3):
        store.put((0, i), blob(i))
    assert (0, 0) in disk and (0, 1) in disk
    return store, disk


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_payload_byte_is_detected(tmp_path):
    store, disk = spilled_store(tmp_path)
    flip_byte(disk.path((0, 0)), HEADER.size + 17)
    with pytest.raises(BlockIntegrityError, match="checksum"):
        store.get((0, 0))
    assert torch.equal(store.get((0, 1)), blob(1))  # the other blocks are unaffected
    store.close()


def test_every_single_bit_flip_in_a_block_file_is_detected(tmp_path):
    path, data = tmp_path / "0-0.kvb", blob(0).numpy().tobytes()
    write_block_file(path, data)
    good = path.read_bytes()
    for i in range(len(good) * 8):  # header and payload, bit by bit
        damaged = bytearray(good)
        damaged[i // 8] ^= 1 << (i % 8)
        path.write_bytes(damaged)
        with pytest.raises(BlockIntegrityError):
            read_block_file(path, len(data))
    path.write_bytes(good)
    assert read_block_file(path, len(data)).numpy().tobytes() == data


def test_flipped_header_byte_is_detected(tmp_path):
    store, disk = spilled_store(tmp_path)
    flip_byte(disk.path((0, 0)), 9)  # inside the length field
    with pytest.raises(BlockIntegrityError, match="header"):
        store.get((0, 0))
    store.close()


@pytest.mark.parametrize("keep", [10, HEADER.size + 50])
def test_truncated_block_is_detected(tmp_path, keep):
    store, disk = spilled_store(tmp_path)
    path = disk.path((0, 1))
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(BlockIntegrityError, match="truncated"):
        store.get((0, 1))
    store.close()


def test_block_longer_than_its_header_says_is_detected(tmp_path):
    store, disk = spilled_store(tmp_path)
    with open(disk.path((0, 1)), "ab") as f:
        f.write(b"\x00")  # the payload and its checksum are intact; one byte too many follows them
    with pytest.raises(BlockIntegrityError, match="longer than its header says"):
        store.get((0, 1))
    store.close()


def test_deleted_block_is_detected(tmp_path):
    store, disk = spilled_store(tmp_path)
    disk.path((0, 0)).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        store.get((0, 0))
    store.close()


def test_corrupt_block_in_a_prefetch_is_reported_to_the_caller(tmp_path):
    store, disk = spilled_store(tmp_path)
    flip_byte(disk.path((0, 1)), HEADER.size)
    keys = ((0, 0), (0, 1))
    store.prefetch(keys)
    with pytest.raises(BlockIntegrityError):
        store.wait(keys)
    store.close()


def test_full_disk_gives_a_clear_error_and_leaves_the_store_consistent(tmp_path, monkeypatch):
    store, disk = spilled_store(tmp_path)

    def no_space(f, data: bytes) -> None:
        f.write(data[: len(data) // 2])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(memhier.tiers, "write_bytes", no_space)
    with pytest.raises(OSError, match="no space left") as info:
        store.put((0, 3), blob(3))  # (0, 2) must be demoted to disk to make room
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in disk.directory.iterdir()) == ["0-0.kvb", "0-1.kvb"]  # no temp file left
    for i in range(3):  # every earlier block is still where it was, intact
        assert torch.equal(store.get((0, i)), blob(i))
    for tier in store.tiers:
        assert tier.used <= tier.budget
    store.put((0, 3), blob(3))  # space is back: the store carries on
    assert torch.equal(store.get((0, 3)), blob(3))
    store.close()


def test_writes_are_atomic_renames(tmp_path, monkeypatch):
    disk = DiskTier(10_000, tmp_path)
    renames = []
    real_replace = memhier.tiers.os.replace
    monkeypatch.setattr(memhier.tiers.os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    disk.insert((1, 2), blob(0))
    assert [(Path(a).suffix, Path(b).name) for a, b in renames] == [(".tmp", "1-2.kvb")]
    disk.close()


def test_close_removes_the_spill_directory(tmp_path):
    store, disk = spilled_store(tmp_path)
    assert any(disk.directory.iterdir())
    store.close()
    assert not disk.directory.exists()
    assert list(tmp_path.iterdir()) == []


def test_spill_directory_is_removed_at_exit_without_close(tmp_path):
    code = (
        "import sys, torch\n"
        "from memhier.tiers import DiskTier\n"
        "d = DiskTier(10_000, sys.argv[1])\n"
        "d.insert((0, 0), torch.zeros(64, dtype=torch.uint8))\n"
        "print(d.directory)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True,
                         check=True)
    assert Path(out.stdout.strip()).parent == tmp_path
    assert not Path(out.stdout.strip()).exists()
