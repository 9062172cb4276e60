"""The training loop: it learns, it resumes exactly, it converts MHA to GQA, and a NaN loses nothing."""

import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toymodel import checkpoint as ckpt
from training.config import AttnConfig, ModelSchema, OptimConfig, TrainConfig
from corpus.mix import IGNORE
from training.loop import Trainer, lm_loss, lr_at, seq_len_at


def config(n_kv_head=2, **train) -> TrainConfig:
    opt = dict(batch_size=4, max_steps=8, warmup_steps=2, lr=3e-3, eval_interval=4, eval_batches=2,
               ckpt_interval=4, keep_checkpoints=0)
    opt.update(train)
    return TrainConfig(
        model=ModelSchema(vocab_size=64, n_layer=2, n_head=4, d_model=32, block_size=16),
        attn=AttnConfig(name=f"kv{n_kv_head}", n_kv_head=n_kv_head),
        train=OptimConfig(**opt),
    )


def tokens(n=4000, seed=0):
    """A learnable stream: a random walk over 64 tokens, so the next token is one of three."""
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.integers(-1, 2, size=n)) % 64).astype(np.uint16)


def trainer(tmp_path, cfg, name="run"):
    return Trainer(cfg, tokens(), tokens(seed=1), tmp_path / name, torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_few_steps_reduce_the_loss(tmp_path, dtype):
    t = trainer(tmp_path, config(max_steps=40, lr=1e-2, eval_interval=40, ckpt_interval=40, dtype=dtype))
    before = t.evaluate()
    summary = t.run()
    assert summary["val_loss"] < before - 0.5 and summary["dtype"] == dtype
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]))
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # bf16 products, fp32 master weights
    assert all(v.dtype == torch.float32 for state in t.optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.is_floating_point())


def test_the_loss_weighs_every_row_the_same():
    logits, targets = torch.randn(3, 5, 7), torch.randint(7, (3, 5))
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(lm_loss(logits, targets), plain)  # nothing ignored: the mean over all tokens
    masked = targets.clone()
    masked[0, :4] = IGNORE  # row 0 scores its last token only, and it still counts as a whole row
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    expected = (per_token[0, 4] + per_token[1].mean() + per_token[2].mean()) / 3
    assert torch.allclose(lm_loss(logits, masked), expected)


def test_sequence_length_warms_up_in_multiples_of_64_then_stays_at_the_block_size():
    cfg = OptimConfig(seq_warmup_steps=10, seq_len_start=256)
    lengths = [seq_len_at(step, cfg, 1024) for step in range(12)]
    assert lengths[0] == 256 and lengths[10:] == [1024, 1024] and lengths == sorted(lengths)
    assert all(n % 64 == 0 for n in lengths) and 512 in lengths
    assert seq_len_at(0, OptimConfig(), 1024) == 1024  # no warmup: full rows from the start


def test_a_warmup_step_trains_on_more_shorter_rows_of_the_same_tokens(tmp_path):
    t = trainer(tmp_path, config(seq_warmup_steps=4, seq_len_start=8, batch_size=2))
    _, _, tokens = t.train_step()  # block_size 16: 4 rows of 8 tokens
    assert tokens == 2 * 16
    assert t.run()["steps"] == 8


def test_resume_continues_exactly(tmp_path):  # float32: bit-exactness is the point
    straight = trainer(tmp_path, config(dtype="float32"), "straight")
    straight.run()
    first = trainer(tmp_path, config(dtype="float32"), "halves")
    first.run(until_step=4)
    cfg = config(dtype="float32")
    cfg.resume = True
    second = trainer(tmp_path, cfg, "halves")
    assert second.step == 4
    second.run()
    a, b = straight.model.state_dict(), second.model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert abs(straight.evaluate() - second.evaluate()) < 1e-6


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = config()
    cfg.resume = True
    with pytest.raises(FileNotFoundError, match="drop resume=true"):
        trainer(tmp_path, cfg)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    t = trainer(tmp_path, config())
    t.run(until_step=4)
    good = ckpt.resolve_checkpoint(tmp_path / "run")
    before = (good / ckpt.WEIGHTS).read_bytes()
    with torch.no_grad():
        t.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        t.run()
    assert ckpt.resolve_checkpoint(tmp_path / "run") == good
    assert (good / ckpt.WEIGHTS).read_bytes() == before


def test_init_from_mha_pools_kv_heads(tmp_path):
    mha = trainer(tmp_path, config(n_kv_head=4), "mha")
    mha.run(until_step=4)
    cfg = config(n_kv_head=2)
    cfg.init_from = str(tmp_path / "mha")
    gqa = trainer(tmp_path, cfg, "gqa")
    k_mha = mha.model.layers[1].attn.k_proj.weight.view(2, 2, 8, 32)  # (H_kv, G, D, d_model)
    torch.testing.assert_close(gqa.model.layers[1].attn.k_proj.weight, k_mha.mean(1).reshape(16, 32))
    torch.testing.assert_close(gqa.model.embed_tokens.weight, mha.model.embed_tokens.weight)
    assert gqa.step == 0  # up-training starts its own schedule


def test_init_from_a_different_model_names_the_difference(tmp_path):
    mha = trainer(tmp_path, config(n_kv_head=4), "mha")
    mha.run(until_step=4)
    cfg = config()
    cfg.model.d_model = 64
    cfg.init_from = str(tmp_path / "mha")
    with pytest.raises(ValueError, match="d_model: checkpoint 32 vs requested 64"):
        trainer(tmp_path, cfg, "other")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


# A run whose second save is killed (SIGKILL) after writing the weights, before the rename: what `kill -9` during a
# checkpoint leaves behind. It trains with this file's config().
KILLED_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, "tests/training")
from test_trainer import config, tokens
from toymodel import checkpoint
from training.loop import Trainer

t = Trainer(config(), tokens(), tokens(seed=1), sys.argv[1], torch.device("cpu"))
t.run(until_step=4)  # a good checkpoint
write = checkpoint.save_file
checkpoint.save_file = lambda *a: (write(*a), os.kill(os.getpid(), signal.SIGKILL))
t.run()
"""


def test_a_save_killed_mid_write_is_cleaned_up_at_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(run_dir)], cwd=Path(__file__).parents[2],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (leftover,) = (run_dir / "checkpoints").glob(".step_*.tmp-*")  # the temporary folder of the killed save
    assert ckpt.resolve_checkpoint(run_dir).name == "step_0000004"  # the last good checkpoint stayed in place
    cfg = config()
    cfg.resume = True
    restarted = trainer(tmp_path, cfg)
    assert not leftover.exists() and restarted.step == 4
