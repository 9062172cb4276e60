"""Checkpoints round-trip exactly, and a damaged or mismatched one is refused with the file and reason named."""

import json
import os
import subprocess
import sys

import pytest
import torch

from toymodel import checkpoint as ckpt
from toymodel.config import ModelConfig
from toymodel.model import Transformer

CFG = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=32)


def saved(tmp_path, step=5, keep=0):
    torch.manual_seed(0)
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 61, (1, 8))).sum().backward()
    opt.step()
    return model, ckpt.save_checkpoint(tmp_path / "run", step, model, CFG, opt, extra={"note": "x"}, keep=keep)


def test_round_trip_is_exact(tmp_path):
    model, path = saved(tmp_path)
    ckpt_dir = ckpt.resolve_checkpoint(tmp_path / "run")  # follows `latest`
    assert ckpt_dir == path
    config = ckpt.load_model_config(ckpt_dir)
    assert config == CFG
    again = Transformer(config)
    ckpt.load_weights(again, ckpt_dir)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert again.lm_head.weight is again.embed_tokens.weight  # still tied after loading
    opt = torch.optim.AdamW(again.parameters())
    ckpt.load_optimizer(opt, ckpt_dir)
    assert opt.state_dict()["state"][0]["step"] == 1
    assert ckpt.read_meta(ckpt_dir)["note"] == "x"


def test_latest_moves_and_old_checkpoints_are_pruned(tmp_path):
    saved(tmp_path, step=1, keep=2)
    saved(tmp_path, step=2, keep=2)
    _, last = saved(tmp_path, step=3, keep=2)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_0000002", "step_0000003"]
    assert ckpt.resolve_checkpoint(tmp_path / "run") == last


def test_a_fresh_run_over_a_longer_one_keeps_what_it_just_wrote(tmp_path):
    saved(tmp_path, step=200, keep=2)
    saved(tmp_path, step=300, keep=2)
    _, last = saved(tmp_path, step=100, keep=2)  # a new run in the same folder: its step numbers are smaller
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_0000100", "step_0000300"]
    assert ckpt.resolve_checkpoint(tmp_path / "run") == last


def test_flipped_byte_is_detected(tmp_path):
    _, path = saved(tmp_path)
    weights = path / ckpt.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # inside a tensor: the safetensors header stays valid, only the checksum can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors are corrupt"):
        ckpt.load_weights(Transformer(CFG), path)


def test_truncated_file_is_detected_without_checksum(tmp_path):
    _, path = saved(tmp_path)
    meta = json.loads((path / ckpt.CONFIG).read_text())
    del meta["sha256"]
    (path / ckpt.CONFIG).write_text(json.dumps(meta))
    weights = path / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        ckpt.load_weights(Transformer(CFG), path)


def test_wrong_shapes_name_the_mismatch(tmp_path):
    _, path = saved(tmp_path)
    other = Transformer(ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=4, d_model=32, block_size=32))
    with pytest.raises(ValueError, match=r"k_proj.weight: checkpoint \(16, 32\) vs model \(32, 32\)"):
        ckpt.load_weights(other, path)


def test_missing_or_broken_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="python train.py"):
        ckpt.resolve_checkpoint(tmp_path / "nothing-here")
    _, path = saved(tmp_path)
    (path / ckpt.CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="config.json is corrupt"):
        ckpt.load_model_config(path)


def dead_pid() -> int:
    """The id of a process that has just exited (ids are not reused that fast)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    _, good = saved(tmp_path)
    root = tmp_path / "run" / "checkpoints"
    dead, live = root / f".step_0000006.tmp-{dead_pid()}", root / f".step_0000007.tmp-{os.getppid()}"
    for folder in (dead, live):
        folder.mkdir()
        (folder / ckpt.WEIGHTS).write_bytes(b"half a file")
    stale_latest = tmp_path / "run" / f".latest.tmp-{dead_pid()}"
    stale_latest.write_text("step_0000006\n")
    assert sorted(ckpt.remove_stale_temporaries(tmp_path / "run")) == sorted([dead, stale_latest])
    assert not dead.exists() and not stale_latest.exists()
    assert live.exists()  # its writer (our parent process) still runs: it may be about to rename it
    assert ckpt.resolve_checkpoint(tmp_path / "run") == good


@pytest.mark.parametrize("name, block_size", [("tiny-mha", 256), ("ctx1k-keys", 1024)])
def test_a_shipped_model_is_named_by_its_name_and_reports_beside_it(name, block_size):
    folder = ckpt.resolve_checkpoint(name)
    assert folder == ckpt.SHIPPED[name] and (folder / "README.md").is_file()
    assert ckpt.load_model_config(folder).block_size == block_size
    assert str(ckpt.run_folder(folder)) == f"runs/{name}-pretrained"  # never inside the installed package
    with pytest.raises(FileNotFoundError, match="shipped model .*ctx1k-keys"):
        ckpt.resolve_checkpoint("ctx1k-kyes")
