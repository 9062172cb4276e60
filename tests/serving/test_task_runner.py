"""The task runner (serving/tasks.py): every sample is scored through the cache, the continuation likelihood equals
a direct computation, and the summaries and the needle picture come out."""

import math

import pytest
import torch
import torch.nn.functional as F

from cache.presets import PRESETS, build_cache
from corpus.splits import validation_tokens
from corpus.tasks import TASK_TYPES, make_samples
from corpus.tokenizer import VOCAB_SIZE, get_tokenizer
from serving.tasks import accuracy_grid, batches, continuation_log_likelihood, plot_needles, run_tasks, summarize
from toymodel.config import ModelConfig
from toymodel.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
ENC = get_tokenizer()
CONFIG = ModelConfig(vocab_size=VOCAB_SIZE, n_layer=2, n_head=2, n_kv_head=1, d_model=64, block_size=512)  # D = 32


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


@pytest.fixture(scope="module")
def samples():
    return make_samples(ENC, validation_tokens(None), list(TASK_TYPES), [256, 320], [0.0, 1.0], 1, seed=3,
                        max_length=CONFIG.block_size)


def new_cache(preset: str):
    return lambda B, T: build_cache(PRESETS[preset], CONFIG, B, torch.device("cpu"), torch.float32, max_tokens=T)


def test_batches_group_equal_lengths_of_one_task(samples):
    for group in batches(samples, batch_size=2):
        assert len({(samples[i].task, len(samples[i].prompt)) for i in group}) == 1 and len(group) <= 2
    assert sorted(i for g in batches(samples, 2) for i in g) == list(range(len(samples)))


@pytest.mark.parametrize("preset", ["full", "sink", "quant4"])
def test_every_sample_is_scored_through_the_cache(model, samples, preset):
    results, seconds = run_tasks(model, samples, new_cache(preset), ENC, batch_size=4, progress=False)
    assert len(results) == len(samples) and seconds > 0
    for r, s in zip(results, samples):
        assert (r["task"], r["context_length"], r["depth"]) == (s.task, s.context_length, s.depth)
        assert math.isfinite(r["score"])
        assert 0.0 <= r["score"] <= 1.0 if s.task != "continue" else r["score"] <= 0.0
    summary = summarize(results)
    assert set(summary["task"]) == set(TASK_TYPES) and set(summary["task_type"]) == set(TASK_TYPES.values())


def test_continuation_likelihood_through_the_full_cache_equals_a_direct_computation(model, samples):
    s = next(s for s in samples if s.task == "continue")
    prompt, answer = torch.tensor([s.prompt]), torch.tensor([s.answer])
    got = continuation_log_likelihood(model, prompt, answer, new_cache("full")(1, prompt.shape[1] + answer.shape[1]))
    with torch.no_grad():
        logits = model(torch.cat([prompt, answer[:, :-1]], dim=1))[:, prompt.shape[1] - 1 :]  # (1, N, V)
    want = F.log_softmax(logits.float(), dim=-1).gather(-1, answer.unsqueeze(-1)).mean()
    torch.testing.assert_close(got, want.view(1), rtol=0, atol=1e-5)


def test_needle_picture_has_a_cell_per_length_and_depth(model, samples, tmp_path):
    results, _ = run_tasks(model, samples, new_cache("full"), ENC, progress=False)
    lengths, depths, grid = accuracy_grid(results, [0.0, 1.0])
    assert lengths == [256, 320] and depths == [0.0, 1.0] and len(grid) == 2 and len(grid[0]) == 2
    path = plot_needles({"full": results, "again": results}, tmp_path / "needles.png", [0.0, 1.0])
    assert path.stat().st_size > 1000


def test_a_measured_depth_counts_for_the_nearest_requested_one():
    """Needles land on token boundaries (0.2487 for 0.25): rows are the requested depths, never tenths of them."""
    results = [{"task_type": "retrieval", "context_length": 256, "depth": d, "score": s}
               for d, s in ((0.2487, 1.0), (0.7512, 0.0), (0.7399, 1.0), (0.002, 1.0))]
    lengths, depths, grid = accuracy_grid(results, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert lengths == [256] and depths == [0.0, 0.25, 0.75] and grid == [[1.0], [1.0], [0.5]]


def test_no_retrieval_task_means_no_picture_and_no_file(tmp_path):
    results = [{"task_type": "copy", "context_length": 256, "depth": 0.5, "score": 1.0}]
    assert plot_needles({"full": results}, tmp_path / "needles.png", [0.5]) is None
    assert not (tmp_path / "needles.png").exists()
