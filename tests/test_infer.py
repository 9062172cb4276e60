"""infer.py as a user runs it, against a tiny checkpoint: generation streams and reports, batched prompts equal
single ones, perplexity runs past the training context, every preset builds, and bad input is named."""

import errno
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import memhier.tiers  # noqa: E402
from cli_checks import assert_one_line_error, infer_in_process, run  # noqa: E402  (tests/cli_checks.py)
from infer import to_typed  # noqa: E402
from cache.presets import PRESETS, build_cache  # noqa: E402
from toymodel.checkpoint import load_weights, resolve_checkpoint, save_checkpoint  # noqa: E402
from toymodel.config import ModelConfig  # noqa: E402
from toymodel.model import Transformer  # noqa: E402
from corpus.tokenizer import get_tokenizer  # noqa: E402

CONFIG = ModelConfig(vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, d_model=128, block_size=32)  # head_dim 32
PRESET_FILES = sorted(p.stem for p in (ROOT / "conf" / "cache").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder holding one checkpoint of a random tiny model, trained (in its meta) on a small text file."""
    root = tmp_path_factory.mktemp("infer")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"To be, or not to be, that is question {i}.\n" for i in range(300)))
    torch.manual_seed(0)
    data = {"source": "textfile", "path": str(corpus), "val_docs": [], "val_fraction": 0.2,
            "cache_dir": str(root / "tokens")}
    save_checkpoint(root / "run", 1, Transformer(CONFIG), CONFIG, extra={"run": {"data": data}})
    return root / "run"


infer = infer_in_process  # infer.py's main in this process, on a checkpoint (tests/cli_checks.py)


def latest_report(run_dir: Path) -> dict:
    return json.loads(max((run_dir / "infer").glob("*.json")).read_text())


def greedy_alone(run_dir, prompt, capsys, monkeypatch, cache="full", new=6) -> str:
    code, out = infer(run_dir, [f"prompt='{prompt}'", f"max_new_tokens={new}", "sampling.temperature=0",
                                f"cache={cache}"], capsys, monkeypatch)
    assert code == 0, out
    return latest_report(run_dir)["texts"][0]


def test_generate_streams_and_reports_every_figure(run_dir):
    cmd = [sys.executable, "infer.py", f"ckpt={run_dir}", "cache=full", "prompt=To be", "max_new_tokens=8"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("To be")
    for label in ("prefill tokens/s", "decode tokens/s", "KV bytes held", "KV bytes, full fp16 cache",
                  "compression ratio", "bits per cached element", "peak memory"):
        assert label in result.stdout
    report = latest_report(run_dir)
    (batch,) = report["batches"]
    assert batch["batch_size"] == 1 and batch["new_tokens"] == 8 and batch["tokens_seen"] == batch["prompt_tokens"] + 7
    assert batch["kv_bytes_full_fp16"] == batch["tokens_seen"] * CONFIG.kv_bytes_per_token(2)
    assert batch["compression_ratio"] == pytest.approx(batch["kv_bytes_full_fp16"] / batch["kv_bytes"])
    assert batch["bits_per_element"] > 0 and batch["peak_memory_bytes"] > 0
    assert batch["prefill_tokens_per_s"] > 0 and batch["decode_tokens_per_s"] > 0
    assert report["texts"][0].startswith("To be") and report["texts"][0] in result.stdout


def test_greedy_text_equals_uncached_model(run_dir, capsys, monkeypatch):
    text = greedy_alone(run_dir, "To be, or", capsys, monkeypatch)
    enc = get_tokenizer()
    model = Transformer(CONFIG)
    load_weights(model, resolve_checkpoint(run_dir))
    seq = torch.tensor([enc.encode_ordinary("To be, or")])
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model.eval()(seq)[:, -1:].argmax(-1)], dim=1)
    assert text == enc.decode(seq[0].tolist())


def test_same_seed_same_text(run_dir, capsys, monkeypatch):
    texts = []
    for seed in (5, 5, 6):
        args = ["prompt=To be", "max_new_tokens=12", "sampling.temperature=1.0", "sampling.top_k=50",
                "sampling.top_p=0.9", f"sampling.seed={seed}"]
        code, out = infer(run_dir, args, capsys, monkeypatch)
        assert code == 0, out
        texts.append(latest_report(run_dir)["texts"][0])
    assert texts[0] == texts[1] != texts[2]


@pytest.mark.parametrize("cache", ["quant8", "kivi4", "sink_int4", "minicache"])
def test_prompt_file_batches_and_matches_single_prompts(run_dir, tmp_path, capsys, monkeypatch, cache):
    """quant8, kivi4 and sink_int4 live in the block pool: every prompt in one ragged batch; MiniCache, in
    contiguous pairs, batches prompts of equal length."""
    prompts = ["To be, or", "not to be", "", "that is the question", "To be, or"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = [f"prompt_file={tmp_path / 'prompts.txt'}", "max_new_tokens=6", "sampling.temperature=0", f"cache={cache}"]
    code, out = infer(run_dir, args, capsys, monkeypatch)
    assert code == 0, out
    report = latest_report(run_dir)
    lengths = {len(get_tokenizer().encode_ordinary(p)) for p in prompts if p}
    assert len(report["batches"]) == (len(lengths) if cache == "minicache" else 1)  # one per distinct length
    assert sum(b["batch_size"] for b in report["batches"]) == 4  # the blank line is skipped
    alone = {p: greedy_alone(run_dir, p, capsys, monkeypatch, cache) for p in set(prompts) if p}
    assert report["texts"] == [alone[p] for p in prompts if p]


def test_ppl_runs_past_the_training_context(run_dir, capsys, monkeypatch):
    code, out = infer(run_dir, ["mode=ppl", "ppl.length=80", "ppl.windows=2"], capsys, monkeypatch)
    assert code == 0, out
    (batch,) = latest_report(run_dir)["batches"]
    assert batch["tokens_seen"] == 80 > CONFIG.block_size
    assert 1 < batch["perplexity"] < math.inf and "perplexity" in out


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_every_preset_composes_and_builds(preset):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        typed = to_typed(compose("infer", overrides=[f"cache={preset}"]))
    assert typed.cache == PRESETS[preset]  # conf/cache/<preset>.yaml says what cache/presets.py says
    cache = build_cache(typed.cache, CONFIG, 2, torch.device("cpu"), torch.float32)
    assert len(cache.layers) == CONFIG.n_layer


def test_every_registered_preset_has_a_config_file():
    assert set(PRESET_FILES) == set(PRESETS)


@pytest.mark.parametrize("args,message", [
    (["cache=nope"], "Could not find 'cache/nope'"),
    (["cache.nope=1"], "nope"),
    (["mode=chat"], "mode='chat'"),
    (["sampling.top_p=2"], "sampling.top_p=2.0"),
    (["prompt="], "prompt='' is empty"),
    (["prompt=null"], "no prompt"),
    (["prompt=" + "to be or not " * 20], "more than max_context=32"),
    (["prompt=x", "prompt_file=/no/such/prompts.txt"], "/no/such/prompts.txt"),
    (["mode=ppl", "ppl.length=100000"], "ppl.length=100000"),
    (["prompt=x", "cache=sink", "cache.budget=3"], "cache.budget=3 must be at least 1 and at least sink + window"),
    (["prompt=x", "cache=quant4", "cache.group_size=24"], "cache.group_size=24 does not divide head_dim=32"),
    (["prompt=x", "cache=quant4", "cache.codec=int3"], "unknown codec 'int3'; valid codecs: fp, fp16, int2"),
    (["prompt=x", "cache.policy=lru"], "unknown cache policy 'lru'"),
    (["mode=tasks", "tasks.names=[]"], "tasks.names is empty"),
    (["mode=tasks", "tasks.depths=[]"], "tasks.depths is empty"),
])
def test_bad_input_is_named(run_dir, capsys, monkeypatch, args, message):
    code, out = infer(run_dir, args, capsys, monkeypatch)
    assert code != 0
    assert message in f"{code}{out}"


# Bad paths, budgets and types, as a user meets them: each ends in one line naming the problem. (path, args)
ONE_LINE_ERRORS = {
    "spill_dir is a file": ["cache=quant4", "memhier=on", "memhier.spill_dir={file}"],
    "persist_dir under a file": ["cache=quant4", "memhier=on", "memhier.persist=true", "memhier.persist_dir={file}/p"],
    "every tier full": ["cache=quant4", "memhier=on", "cache.block_tokens=4", "memhier.device_bytes=0",
                        "memhier.host_bytes=0", "memhier.disk_bytes=0"],
    "prompt_file is a directory": ["prompt_file={folder}"],
    "a number that is text": ["cache.budget=abc"],
}
ONE_LINE_MESSAGES = {
    "spill_dir is a file": ["memhier.spill_dir={file} cannot be created", "File exists"],
    "persist_dir under a file": ["memhier.persist_dir={file}/p cannot be created", "Not a directory"],
    "every tier full": ["fits in no tier", "raise memhier.disk_bytes"],  # TierFullError, was a traceback
    "prompt_file is a directory": ["prompt_file={folder} is a directory"],
    "a number that is text": ["cache.budget: Value 'abc' of type 'str' could not be converted to Integer"],
}


@pytest.mark.parametrize("case", ONE_LINE_ERRORS)
def test_bad_paths_budgets_and_types_end_in_one_line(run_dir, tmp_path, case):
    (tmp_path / "a-file").write_text("not a folder")
    names = {"file": tmp_path / "a-file", "folder": tmp_path}
    args = [a.format(**names) for a in ONE_LINE_ERRORS[case]]
    result = run("infer.py", [f"ckpt={run_dir}", "prompt=To be or not to be that is", "max_new_tokens=4", *args],
                 tmp_path, OMP_NUM_THREADS="1")
    assert_one_line_error(result, *(m.format(**names) for m in ONE_LINE_MESSAGES[case]))


def test_a_full_disk_ends_in_one_line(run_dir, tmp_path, capsys, monkeypatch):
    def no_space(f, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(memhier.tiers, "write_bytes", no_space)
    args = ["cache=quant4", "memhier=on", "cache.block_tokens=4", "memhier.device_bytes=0", "memhier.host_bytes=0",
            f"memhier.spill_dir={tmp_path}", "prompt=To be or not to be that is", "max_new_tokens=4"]
    code, out = infer(run_dir, args, capsys, monkeypatch)
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    assert "no space left on the device holding" in code and "Traceback" not in out
    assert not list(tmp_path.glob("kvlab-spill-*/*"))  # no half-written block left behind


def table_row(out: str, label: str) -> str:
    """The value column of the summary table's row `label` (one batch)."""
    (line,) = [line for line in out.splitlines() if line.startswith(label + "  ")]
    return line.split()[-1]


def test_the_summary_shows_what_the_prefix_store_did(run_dir, tmp_path, capsys, monkeypatch):
    args = ["cache=quant4", "memhier=on", "memhier.persist=true", f"memhier.persist_dir={tmp_path}",
            "cache.block_tokens=4", "prompt=To be or not to be that is the question whether tis nobler in the mind",
            "max_new_tokens=2"]
    code, out = infer(run_dir, args, capsys, monkeypatch)
    assert code == 0, out
    assert int(table_row(out, "memhier prefix entries written")) >= 2
    assert table_row(out, "memhier prefix store hits") == "0"
    entries = sorted(tmp_path.glob("*.kvp"))
    for path in entries[:2]:  # two damaged entries (which blocks they hold does not matter)
        path.write_bytes(path.read_bytes()[:-1])
    code, out = infer(run_dir, args, capsys, monkeypatch)
    assert code == 0, out
    assert table_row(out, "memhier prefix bad entries (deleted, recomputed)") == "2"
    for label in ("memhier prefix store hits", "memhier prefix store misses", "memhier prefix entries evicted"):
        assert table_row(out, label).isdigit()
    assert int(table_row(out, "memhier prefix entries written")) == 2  # both rewritten in this one run
    assert len(list(tmp_path.glob("*.kvp"))) == len(entries)


def test_missing_checkpoint_says_to_train_first(tmp_path):
    cmd = [sys.executable, "infer.py", f"ckpt={tmp_path / 'runs' / 'tiny-mha'}", "prompt=hi"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "python train.py" in result.stderr and "Traceback" not in result.stderr


def test_wandb_run_gets_the_figures(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, out = infer(run_dir, ["logger=wandb", "prompt=To be", "max_new_tokens=3"], capsys, monkeypatch)
    assert code == 0, out
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    keys = (b"infer/decode_tokens_per_s", b"infer/kv_bytes", b"infer/compression_ratio", b"infer/peak_memory")
    for _ in range(300):  # W&B's service process writes it; twice it held only its header as finish() returned
        if all(key in log.read_bytes() for key in keys):
            break
        time.sleep(0.1)
    for key in keys:
        assert key in log.read_bytes(), key


@pytest.mark.parametrize("preset", ["full", "sink"])
def test_mode_tasks_scores_every_sample_and_draws_the_needles(run_dir, capsys, monkeypatch, preset):
    code, out = infer(run_dir, ["mode=tasks", f"cache={preset}", "max_context=256", "tasks.lengths=[256]",
                                "tasks.depths=[0.0,1.0]", "tasks.samples=1"], capsys, monkeypatch)
    assert code == 0, out
    assert "score, retrieval tasks" in out and "task samples/s" in out
    report = latest_report(run_dir)
    samples = report["samples"]
    assert len(samples) == 4 * 2 + 1  # four needle tasks at two depths, and one continuation
    assert all(math.isfinite(s["score"]) and {"task", "task_type", "depth", "generated"} <= s.keys()
               for s in samples)
    png = max((run_dir / "infer").glob("*.png"))
    assert png.stat().st_size > 1000 and png.stem == max((run_dir / "infer").glob("*.json")).stem


def test_mode_tasks_through_memhier_scores_as_the_in_memory_cache_does(run_dir, capsys, monkeypatch):
    args = ["mode=tasks", "cache=quant4", "max_context=256", "tasks.lengths=[256]", "tasks.depths=[0.5]",
            "tasks.samples=1", "tasks.names=[passkey,recall]"]
    scores = []
    for memhier in ("off", "on"):
        code, out = infer(run_dir, args + [f"memhier={memhier}"], capsys, monkeypatch)
        assert code == 0, out
        scores.append([(s["task"], s["score"], s["generated"]) for s in latest_report(run_dir)["samples"]])
    assert scores[0] == scores[1]  # exact mode: the same bits, so the same greedy answers


def test_mode_tasks_without_a_retrieval_task_scores_and_says_there_is_no_picture(run_dir, capsys, monkeypatch):
    code, out = infer(run_dir, ["mode=tasks", "max_context=256", "tasks.names=[recall]", "tasks.lengths=[256]",
                                "tasks.depths=[0.5]", "tasks.samples=1"], capsys, monkeypatch)
    assert code == 0, out
    assert "score, recall" in out and "no picture" in out
    assert len(latest_report(run_dir)["samples"]) == 1
