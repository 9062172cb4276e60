"""Run the long-context task suite (corpus/tasks.py) through a cache and score every sample.

    samples ─group by (task, context length)─▶ batches of equal-length prompts (no padding to attend)
            ─generating tasks─▶ greedy generate through a fresh cache ─▶ score(sample, generated)
            ─continue─▶ prefill the prompt, then feed the true continuation one token at a time through the same
                        cache ─▶ mean log-likelihood per token of the true text

Every token passes through the layer caches, so eviction and quantization act on every prediction, exactly as
in `infer.py mode=generate`. The result of each sample keeps what the analyses need: its task and type, length,
depth, score, and the generated text.

`accuracy_grid` and `plot_needles` turn results into the needle-in-a-haystack picture: accuracy by context length
x needle depth, one panel per preset.
"""

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import tiktoken
from tqdm import tqdm

from cache.model_cache import ModelCache
from toymodel.threads import ThreadGovernor
from corpus.tasks import Sample, score
from serving.generate import Sampling, generate

GREEDY = Sampling(temperature=0.0)
SLACK_TOKENS = 4  # generated past the answer's length, so a scorer sees what follows it


def batches(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Indices of samples grouped by (task, context length), in order of first appearance, at most batch_size each:
    one group is one (B, T) batch whose rows need the same number of new tokens."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[(s.task, s.context_length)].append(i)
    return [idx[a : a + batch_size] for idx in groups.values() for a in range(0, len(idx), batch_size)]


@torch.inference_mode()
def continuation_log_likelihood(model: torch.nn.Module, prompt: torch.Tensor, answer: torch.Tensor,
                                cache: ModelCache) -> torch.Tensor:
    """prompt (B, T), answer (B, N) -> (B,) mean log p(answer token | everything before it), every answer token
    after the first fed one at a time through `cache` (as a generation would have fed it)."""
    logits = [model(prompt, cache)[:, -1]]  # (B, V): predicts answer[:, 0]
    for i in range(answer.shape[1] - 1):
        logits.append(model(answer[:, i : i + 1], cache)[:, -1])
    logp = F.log_softmax(torch.stack(logits, dim=1).float(), dim=-1)  # (B, N, V)
    return logp.gather(-1, answer.unsqueeze(-1)).squeeze(-1).mean(dim=1)  # (B,)


def run_tasks(model: torch.nn.Module, samples: list[Sample], new_cache: Callable[[int, int], ModelCache],
              enc: tiktoken.Encoding, batch_size: int = 8, progress: bool = True,
              threads: ThreadGovernor | None = None) -> tuple[list[dict], float]:
    """Score every sample through caches made by `new_cache(batch_size, max_tokens)`. Returns one dict per sample,
    in the samples' order, and the seconds it took. `threads` sets the thread count of generated tokens' steps."""
    device = next(model.parameters()).device
    results: list[dict | None] = [None] * len(samples)
    start = time.perf_counter()
    for group in tqdm(batches(samples, batch_size), desc="tasks", unit="batch", disable=not progress):
        first = samples[group[0]]
        prompt = torch.tensor([samples[i].prompt for i in group], device=device)  # (B, T)
        if first.task == "continue":
            cache = new_cache(len(group), prompt.shape[1] + len(first.answer))
            answer = torch.tensor([samples[i].answer for i in group], device=device)  # (B, N)
            scores = continuation_log_likelihood(model, prompt, answer, cache).tolist()
            generated = [""] * len(group)
        else:
            n_new = max(len(samples[i].answer) for i in group) + SLACK_TOKENS
            cache = new_cache(len(group), prompt.shape[1] + n_new)
            tokens = generate(model, prompt, cache, n_new, GREEDY, threads=threads).tokens.tolist()  # (B, n_new)
            scores = [score(samples[i], row, enc) for i, row in zip(group, tokens)]
            generated = [enc.decode(row) for row in tokens]
        for i, s, text in zip(group, scores, generated):
            sample = samples[i]
            results[i] = {"task": sample.task, "task_type": sample.task_type, "context_length": sample.context_length,
                          "depth": sample.depth, "score": s, "answer": sample.answer_text, "generated": text}
    return results, time.perf_counter() - start


def default_lengths(block_size: int) -> list[int]:
    """256, 512, ... up to block_size (and block_size itself): the lengths mode=tasks runs when none are given."""
    lengths = [256]
    while lengths[-1] * 2 <= block_size:
        lengths.append(lengths[-1] * 2)
    return lengths + ([block_size] if block_size > lengths[-1] else [])


def figures(results: list[dict], seconds: float) -> dict[str, float]:
    """The report's column: samples, samples/s, and the mean score per task type and per task."""
    summary = summarize(results)
    return {"tasks_samples": len(results), "tasks_samples_per_s": len(results) / seconds,
            **{f"tasks_type_{name}": v for name, v in summary["task_type"].items()},
            **{f"tasks_task_{name}": v for name, v in summary["task"].items()}}


def summarize(results: list[dict]) -> dict[str, dict[str, float]]:
    """Mean score per task and per task type: {"task": {name: mean}, "task_type": {name: mean}}."""
    out: dict[str, dict[str, float]] = {}
    for key in ("task", "task_type"):
        groups: dict[str, list[float]] = defaultdict(list)
        for r in results:
            groups[r[key]].append(r["score"])
        out[key] = {name: sum(v) / len(v) for name, v in groups.items()}
    return out


def accuracy_grid(results: list[dict], depths: list[float]) -> tuple[list[int], list[float], list[list[float]]]:
    """Mean score of the retrieval samples (passkey, multikey) by context length and needle depth: (lengths, depths,
    grid[depth][length]), NaN where a cell has no sample. A sample's depth is where its needle landed (a token
    boundary), so it counts for the nearest of the requested `depths`; the rows are those of them that hold one."""
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for r in results:
        if r["task_type"] == "retrieval":
            nearest = min(depths, key=lambda d: abs(d - r["depth"]))
            cells[(r["context_length"], nearest)].append(r["score"])
    lengths = sorted({n for n, _ in cells})
    rows = sorted({d for _, d in cells})
    grid = [[sum(cells[(n, d)]) / len(cells[(n, d)]) if cells[(n, d)] else math.nan for n in lengths]
            for d in rows]
    return lengths, rows, grid


def plot_needles(results_by_preset: dict[str, list[dict]], path: Path, depths: list[float]) -> Path | None:
    """The needle-in-a-haystack picture: retrieval accuracy by context length (x) and needle depth (y, the requested
    `depths`), one panel per preset, green for found, red for lost. Writes a PNG to `path` and returns it; None, and
    no file, when no preset has a retrieval sample (tasks.names without passkey and multikey)."""
    grids = {preset: accuracy_grid(results, depths) for preset, results in results_by_preset.items()}
    if not any(lengths for lengths, _, _ in grids.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results_by_preset)
    cols = min(n, 8)  # panels wrap after eight, so a comparison of every preset stays readable
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(2.4 * cols + 1.0, 3.0 * -(-n // cols)), squeeze=False)
    for i, (ax, (preset, (lengths, rows, grid))) in enumerate(zip(axes.flat, grids.items())):
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(rows)), [f"{d:.0%}" for d in rows] if i % cols == 0 else [])  # the first column's
        ax.set_title(preset)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("needle depth")
    fig.supxlabel("context length (tokens)")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="retrieval accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
