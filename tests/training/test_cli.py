"""train.py as a user runs it: every config combination composes, bad input is named, W&B runs offline,
and torchrun trains with two gloo processes."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from train import to_typed  # noqa: E402
from cli_checks import assert_one_line_error  # noqa: E402  (tests/cli_checks.py)

GROUPS = {group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
          for group in ("model", "attn", "data", "train", "logger")}
# A model small enough to train for a few steps in a second, on a small text file.
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=4", "model.block_size=16", "train=quick",
        "train.batch_size=2", "train.max_steps=4", "train.eval_interval=2", "train.ckpt_interval=2",
        "data=textfile"]


@pytest.mark.parametrize("combo", list(itertools.product(*GROUPS.values())), ids=lambda c: "-".join(c))
def test_every_combination_composes_and_builds(combo):
    overrides = [f"{g}={o}" for g, o in zip(GROUPS, combo)] + ["data.path=some.txt"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        typed = to_typed(compose("train", overrides=overrides))
    assert typed.model.n_head % typed.attn.n_kv_head == 0
    assert typed.run_name == f"{typed.model.name}-{typed.attn.name}"


def run_train(args, tmp_path, launcher=(sys.executable, "train.py"), env=None):
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    cmd = [*launcher, *TINY, f"data.path={text}", f"data.cache_dir={tmp_path / 'cache'}",
           f"out_dir={tmp_path / 'runs'}", "run_name=t", *args]
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=full_env)


@pytest.mark.parametrize("args,message", [
    (["attn=gqq"], "Could not find 'attn/gqq'"),
    (["train.lrr=1"], "lrr"),
    (["train.lr=fast"], "train.lr"),
    (["attn.n_kv_head=3"], "n_head=4 is not divisible by n_kv_head=3"),
    (["data.path=/no/such/file.txt"], "/no/such/file.txt"),
    (["resume=true"], "drop resume=true"),
])
def test_bad_input_is_named(tmp_path, args, message):
    result = run_train(["logger=none", *args], tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["train.ckpt_interval=0"], "train.ckpt_interval=0 must be in [1, inf)"),  # was: ZeroDivisionError after a step
    (["train.eval_interval=0"], "train.eval_interval=0 must be in [1, inf)"),
    (["logger.log_interval=0"], "logger.log_interval=0 must be in [1, inf)"),
    (["train.max_steps=-5"], "train.max_steps=-5 must be in [1, inf)"),  # was: exit 0, no checkpoint
    (["train.grad_accum=0"], "train.grad_accum=0 must be in [1, inf)"),  # was: loss 0.000, an untrained checkpoint
    (["train.grad_clip=-1"], "train.grad_clip=-1.0 must be in (0, inf]"),  # was: gradients scaled by a negative
    (["model.d_model=abc"], "model.d_model: Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_bad_values_are_refused_at_config_time_in_one_line(tmp_path, args, message):
    result = run_train(["logger=none", *args], tmp_path)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a folder")  # run_train's out_dir
    assert_one_line_error(run_train(["logger=none"], tmp_path), f"cannot create the run folder {tmp_path / 'runs'}",
                          "Not a directory")


def test_the_run_folder_records_the_config(tmp_path):
    result = run_train(["logger=none"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    hydra = tmp_path / "runs" / "t" / "hydra"  # written by train.py: Hydra itself writes nothing (conf/train.yaml)
    assert "max_steps: 4" in (hydra / "config.yaml").read_text()
    assert "train.max_steps=4" in (hydra / "overrides.yaml").read_text()
    assert not (ROOT / "train.log").exists()


def test_offline_wandb_run_keeps_its_metrics(tmp_path):
    result = run_train(["logger=wandb"], tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "runs" / "t" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    log = runs[0].read_bytes()
    for key in (b"train/loss", b"val/loss", b"val/ppl", b"train/tokens_per_s", b"train/lr",
                b"kv_bytes_per_token_fp16"):
        assert key in log, key


def test_torchrun_trains_with_two_gloo_processes(tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29613", "train.py")
    result = run_train(["logger=none"], tmp_path, launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "t" / "latest").read_text().strip() == "step_0000004"
    assert result.stdout.count("done: val loss") == 1  # only rank 0 reports and writes
