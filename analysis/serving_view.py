"""The serving view of finding (1): what each cache the engine serves buys in requests/s when the KV memory is fixed,
as lesson 7's `bench.serving_budget` measures it, scaled to the analysed model's context.

Workload: `requests` greedy requests of random tokens arriving at once, prompts of a quarter to a half of the model's
context, a quarter to a half of it again as new tokens (max_tokens the only stop). The engine's pool holds
`full_sequences` full-cache sequences of the workload's mean length in the model's dtype. Settings: full, quant8
and quant4 (blocks of codes), KV-Compress budgets of prompt / N tokens per head for N in `ratios` (compressed
once, after prefill; protected window 32, or a quarter of the shortest prompt if less), and the largest N again
compressing while decoding (compress_once=False). Prefix caching is off: the prompts share nothing.
"""

import time
from dataclasses import dataclass, field, replace

import torch

from serving.engine import Engine
from serving.serve import random_workload
from toymodel.ranges import POSITIVE, check_ranges


@dataclass
class ServingViewConfig:
    requests: int = field(default=32, metadata=POSITIVE)
    full_sequences: int = field(default=4, metadata=POSITIVE)  # full-cache sequences the KV memory holds
    ratios: list[int] = field(default_factory=lambda: [2, 4, 8])  # KV-Compress: prompt / N tokens kept per head

    def __post_init__(self) -> None:
        check_ranges(self, "sweeps.serving")


QUICK = dict(requests=6, full_sequences=2, ratios=[4])


def run(model: torch.nn.Module, cfg: ServingViewConfig) -> list[dict]:
    """One row per setting: requests/s, output and decode tokens/s, mean running batch, preemptions, prefill
    share, and requests/s against full."""
    c, weight = model.config, next(model.parameters())
    L = c.block_size
    requests = random_workload(cfg.requests, c.vocab_size, prompts=(L // 4, L // 2), new=(L // 4, L // 2))
    mean = sum(len(r.prompt) + r.max_tokens for r in requests) / len(requests)
    kv_bytes = int(cfg.full_sequences * mean * 2 * c.n_layer * c.n_kv_head * c.head_dim * weight.element_size())
    window = min(32, L // 16)
    settings = {"full": ("full", requests), "quant8": ("quant8", requests), "quant4": ("quant4", requests)}
    for n in cfg.ratios:
        settings[f"kvcompress {n}x"] = ("full", [replace(r, max_cache_tokens=max(1, len(r.prompt) // n),
                                                         protected_window_size=window) for r in requests])
    if cfg.ratios:  # the strongest budget again, compressed while decoding too: no sequence outgrows it
        n = max(cfg.ratios)
        settings[f"kvcompress {n}x, decoding"] = ("full", [replace(r, compress_once=False)
                                                           for r in settings[f"kvcompress {n}x"][1]])
    Engine(model, "full", kv_bytes=kv_bytes, prefix_caching=False).generate(requests[:2])  # warm-up
    rows = []
    for name, (preset, reqs) in settings.items():
        engine = Engine(model, preset, kv_bytes=kv_bytes, max_batch=len(reqs), prefix_caching=False)
        start = time.perf_counter()
        done = engine.generate(reqs)
        seconds, s = time.perf_counter() - start, engine.stats
        rows.append({"setting": name, "seconds": seconds, "requests_per_s": len(done) / seconds,
                     "output_tokens_per_s": sum(len(d.tokens) for d in done) / seconds,
                     "decode_tokens_per_s": s.decode_tokens_per_s, "mean_running_batch": s.mean_running_batch,
                     "preemptions": s.preemptions, "prefill_share": s.prefill_seconds / seconds,
                     "kv_bytes": kv_bytes})
    for row in rows:
        row["requests_speedup"] = row["requests_per_s"] / rows[0]["requests_per_s"]
    return rows


def finding(rows: list[dict]) -> str:
    """A sentence from the rows: requests/s against full at the fixed KV memory, and the prefill share."""
    full, others = rows[0], rows[1:]
    parts = ", ".join(f"{r['setting']} {r['requests_speedup']:.2f}x (batch {r['mean_running_batch']:.1f})"
                      for r in others)
    return (f"In the serving engine, with KV memory for about {full['mean_running_batch']:.0f} full-cache sequences "
            f"running at once on average, requests/s against full: {parts}; prefill was "
            f"{full['prefill_share']:.0%} of full's time, which no cache compression shortens.")


def plot(rows: list[dict], path) -> object:
    """Requests/s and mean running batch per setting, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["setting"] for r in rows]
    for ax, key in zip(axes, ("requests_per_s", "mean_running_batch")):
        ax.bar(names, [r[key] for r in rows], color=["0.5"] + ["tab:blue"] * (len(rows) - 1))
        ax.set_title(key.replace("_", " "))
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle("the engine at a fixed KV memory (grey: full)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
