"""`python infer.py mode=serve` (serving/serve.py): workloads from held-out plays or a JSONL file, arrivals, the
figures, the per-request JSONL and the latency picture; a served greedy answer equals infer.py's; bad workloads
are named."""

import json
from pathlib import Path

import pytest
import torch

from serving.generate import Sampling
from serving.serve import ServeConfig, arrival_times, make_workload, percentiles, play_prompts
from toymodel.checkpoint import save_checkpoint
from toymodel.config import ModelConfig
from toymodel.model import Transformer

from cli_checks import infer_in_process  # tests/cli_checks.py

PLAY = "".join(f"**{name}**  \nSpeak, {name.lower()}, of the {i} kings.  \nAnd more.\n\n"
               for i in range(200) for name in ("ROMEO", "JULIET"))

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with a random tiny model whose held-out text is a play (so prompts can end at speakers)."""
    root = tmp_path_factory.mktemp("serve")
    (root / "play.txt").write_text(PLAY)
    data = {"source": "textfile", "path": str(root / "play.txt"), "val_docs": [], "val_fraction": 0.2,
            "cache_dir": str(root / "tokens")}
    config = ModelConfig(vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=128)
    torch.manual_seed(0)
    save_checkpoint(root / "run", 1, Transformer(config), config, extra={"run": {"data": data}})
    return root / "run"


infer = infer_in_process  # infer.py's main in this process, on a checkpoint (tests/cli_checks.py)


def latest(run_dir: Path, suffix: str) -> Path:
    return max((run_dir / "infer").glob(f"*{suffix}"))


def test_prompts_end_at_a_speaker_and_start_at_a_speech():
    encode = lambda text: [ord(c) for c in text]  # noqa: E731  one token a character
    prompts = play_prompts(PLAY, 5, 60, seed=1, encode=encode)
    texts = ["".join(map(chr, p)) for p in prompts]
    assert len(texts) == 5 and all(t.endswith(("**ROMEO**  \n", "**JULIET**  \n")) for t in texts)
    assert all(len(p) <= 60 for p in prompts) and all(t.startswith("**") for t in texts)
    with pytest.raises(ValueError, match="serve.requests=999"):
        play_prompts(PLAY[:300], 999, 60, seed=1, encode=encode)


def test_arrivals_are_a_seeded_poisson_process_and_percentiles_are_ranks():
    times = arrival_times(2000, rate=50.0, seed=3)
    assert times == sorted(times) and times == arrival_times(2000, 50.0, 3)
    assert 2000 / times[-1] == pytest.approx(50.0, rel=0.1)
    assert arrival_times(3, None, 0) == [0.0, 0.0, 0.0]
    assert percentiles([float(i) for i in range(1, 101)], "x") == {"x_p50": 50.0, "x_p90": 90.0, "x_p99": 99.0}


@pytest.mark.parametrize("line, field", [
    ("not json", "not JSON"),
    ('{"max_tokens": 4}', "needs a string 'prompt'"),
    ('{"prompt": "x", "temprature": 1}', "temprature"),
])
def test_a_bad_workload_line_is_named(tmp_path, line, field):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"line 2: .*{field}"):
        make_workload(ServeConfig(workload=str(path)), Sampling(), lambda: "", lambda s: [1, 2])


def test_mode_serve_reports_every_request_and_draws_the_latency_cdf(run_dir, capsys, monkeypatch):
    code, out = infer(run_dir, ["mode=serve", "serve.requests=6", "serve.prompt_tokens=40", "serve.max_tokens=8",
                                "serve.rate=200", "serve.max_batch=4", "serve.headroom=8"], capsys, monkeypatch)
    assert code == 0, out
    for label in ("requests/s", "output tokens/s, end to end", "time to first token (s), p90", "latency (s), p99",
                  "mean running batch", "peak blocks in use", "preemptions"):
        assert label in out
    report = json.loads(latest(run_dir, ".json").read_text())
    (figures,) = report["batches"]
    assert figures["requests"] == 6 and 1 <= figures["mean_running_batch"] <= 4
    records = [json.loads(line) for line in latest(run_dir, ".jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(1 <= r["output_tokens"] <= 8 for r in records)
    assert all(r["time_to_first_token_s"] <= r["latency_s"] for r in records)
    assert latest(run_dir, ".png").stat().st_size > 1000


def test_kv_compress_knobs_come_from_the_workload_line_or_the_serve_group(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "a", "max_cache_tokens": 5, "protected_window_size": 2}\n{"prompt": "b"}\n')
    first, second = make_workload(ServeConfig(workload=str(path), max_cache_tokens=9), Sampling(), lambda: "",
                                  lambda s: [1, 2])
    assert (first.max_cache_tokens, first.protected_window_size) == (5, 2)
    assert (second.max_cache_tokens, second.protected_window_size) == (9, None)  # None: the engine's default
    (generated,) = make_workload(ServeConfig(requests=1, max_cache_tokens=7), Sampling(), lambda: PLAY,
                                 lambda s: [ord(c) for c in s])
    assert generated.max_cache_tokens == 7


@pytest.mark.parametrize("cache", [[], ["cache=sink", "cache.budget=8"]], ids=["full", "sink-evicting"])
def test_a_served_greedy_answer_equals_infer_generate(run_dir, tmp_path, capsys, monkeypatch, cache):
    prompt = "**ROMEO**  \nSpeak, romeo, of the 3 kings.  \n"
    (tmp_path / "w.jsonl").write_text(json.dumps({"prompt": prompt, "max_tokens": 10, "temperature": 0,
                                                  "stop": []}) + "\n")
    code, out = infer(run_dir, ["mode=serve", f"serve.workload={tmp_path / 'w.jsonl'}", *cache], capsys,
                      monkeypatch)
    assert code == 0, out
    served = json.loads(latest(run_dir, ".json").read_text())["texts"][0]
    code, out = infer(run_dir, [f"prompt='{prompt}'", "max_new_tokens=10", "sampling.temperature=0", *cache],
                      capsys, monkeypatch)
    assert code == 0, out
    assert prompt + served == json.loads(latest(run_dir, ".json").read_text())["texts"][0]


@pytest.mark.parametrize("args, message", [
    (["memhier=on"], "memhier=off"),
    (["cache=minicache"], "keep every token"),
    (["serve.workload=/no/such.jsonl"], "/no/such.jsonl does not exist"),
    (["serve.rate=0"], "serve.rate"),
    (["serve.max_cache_tokens=0"], "serve.max_cache_tokens"),
])
def test_what_mode_serve_cannot_do_is_named(run_dir, capsys, monkeypatch, args, message):
    code, out = infer(run_dir, ["mode=serve", "serve.requests=2", *args], capsys, monkeypatch)
    assert code != 0 and message in f"{code}{out}"
