"""`python analyze.py analysis=length`: does a compressed cache change how long the model's answers are, and does a
longer answer eat the per-token speedup end to end? (The MLSys 2025 study's finding (2), its Figures 3 and 16.)

Workload: `prompts` prompts from the held-out plays, each ending at a speaker's name, so the answer is one speech
that ends at its blank line (serving/serve.py's play_prompts); sampled at temperature 1, each prompt with its own
seed, the same in every setting. Settings, each served by the engine (serving/engine.py) at the same KV memory,
every request arriving at once: `full`; the quantized presets (8 and 4 bits: two compression levels); KV-Compress
at each budget of `budgets` (tokens kept per layer and KV head, compressed after prefill and again while decoding);
and the natural variance of the full cache itself: the same seeds at temperatures 0.9 and 1.1, and other seeds
at temperature 1. More presets (`presets`: StreamingLLM, H2O and SnapKV at each budget, KIVI at 4 and 2 bits) are
served the same way: an evicting one in its cohort of the engine, KIVI in an engine of 2- or 4-bit blocks.

Per sample and setting, D = (L_full - L) / L_full x 100, with L the answer's length in tokens: negative when the
setting's answer is longer. |D| > 200 is dropped as an outlier and counted. Two tests per setting, both from
scipy.stats: the Wilcoxon signed-rank test on the paired lengths (are its answers systematically longer or
shorter?), and the Mann-Whitney U test of its |D| against the |D| of the full cache with other seeds (does it change
lengths more than sampling again does?).
"""

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy import stats

from cache.presets import PRESETS, CacheSpec, at_budget
from serving.engine import Engine
from serving.generate import Sampling
from serving.sequence import Request
from serving.serve import play_prompts
from toymodel.ranges import POSITIVE, check_ranges

OUTLIER = 200  # |D| above this many percent is dropped (and counted)
RESEEDED = "full, other seeds"  # the null: what sampling again alone does to lengths


@dataclass
class LengthConfig:
    prompts: int = field(default=500, metadata=POSITIVE)
    prompt_tokens: int = field(default=160, metadata=POSITIVE)  # each prompt at most this long
    max_tokens: int = field(default=96, metadata=POSITIVE)  # an answer still going after this is cut (counted)
    quantized: list[str] = field(default_factory=lambda: ["quant8", "quant4"])
    budgets: list[int] = field(default_factory=lambda: [64, 32])  # KV-Compress: tokens kept per layer and KV head
    # More presets, each served by an engine of its own: the evicting ones at every budget of `budgets`, the others
    # as they are
    presets: list[str] = field(default_factory=lambda: ["sink", "h2o", "snapkv", "kivi4", "kivi2"])
    full_sequences: int = field(default=16, metadata=POSITIVE)  # the KV memory, in full-cache sequences
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, "length")
        unknown = [p for p in self.quantized if p not in ("quant8", "quant4")]
        if unknown:
            raise ValueError(f"length.quantized: {unknown}; the engine serves quant8 and quant4 (block-pool codes)")
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"length.presets: unknown presets {unknown}; choose among {', '.join(PRESETS)}")


QUICK = dict(prompts=20, prompt_tokens=64, max_tokens=32, budgets=[32], full_sequences=4, presets=["sink"])


def shift(full: int, other: int) -> float:
    """D: how much shorter `other`'s answer is than the full cache's, in percent of it (negative: longer)."""
    return (full - other) / max(full, 1) * 100


def shifts(full: list[int], other: list[int]) -> tuple[list[float], int]:
    """D of every pair, those with |D| > OUTLIER dropped; and how many were dropped."""
    d = [shift(f, o) for f, o in zip(full, other, strict=True)]
    kept = [x for x in d if abs(x) <= OUTLIER]
    return kept, len(d) - len(kept)


def settings(cfg: LengthConfig) -> dict[str, tuple[str | CacheSpec, dict, dict]]:
    """Setting name -> (preset, request changes, sampling changes)."""
    out = {"full": ("full", {}, {})}
    out |= {name: (name, {}, {}) for name in cfg.quantized}
    out |= {f"kvcompress {b}": ("full", {"max_cache_tokens": b, "compress_once": False}, {}) for b in cfg.budgets}
    out |= {"full, temp 0.9": ("full", {}, {"temperature": 0.9}), "full, temp 1.1": ("full", {}, {"temperature": 1.1}),
            RESEEDED: ("full", {}, {"seed": 10_000})}  # added to each prompt's own seed
    for name in cfg.presets:  # an evicting one at every budget, the others as they are
        spec = PRESETS[name]
        budgets = [None] if spec.policy == "full" else cfg.budgets
        out |= {name if b is None else f"{name} {b}": (spec if b is None else at_budget(spec, b), {}, {})
                for b in budgets}
    return out


def serve(model: torch.nn.Module, preset: str | CacheSpec, requests: list[Request], kv_bytes: int,
          decode) -> tuple[list, float]:
    """Every request at once through a fresh engine; completions in request order, and the seconds it took."""
    engine = Engine(model, preset, kv_bytes=kv_bytes, max_batch=len(requests), decode=decode, prefix_caching=False)
    start = time.perf_counter()
    done = sorted(engine.generate(requests), key=lambda c: c.id)
    return done, time.perf_counter() - start


def run(model: torch.nn.Module, cfg: LengthConfig, held_out: str, encode, decode, progress) -> dict:
    """Serve the prompts in every setting: per setting its lengths, latencies, tokens/s; per sample its lengths."""
    c, weight = model.config, next(model.parameters())
    prompts = play_prompts(held_out, cfg.prompts, cfg.prompt_tokens, cfg.seed, encode)
    kv_bytes = int(cfg.full_sequences * (cfg.prompt_tokens + cfg.max_tokens) * 2 * c.n_layer * c.n_kv_head
                   * c.head_dim * weight.element_size())
    base = [Request(p, cfg.max_tokens, Sampling(temperature=1.0, seed=cfg.seed + i), stop=("\n\n",))
            for i, p in enumerate(prompts)]
    serve(model, "full", base[:2], kv_bytes, decode)  # warm-up, not recorded
    out = {}
    for name, (preset, knobs, sampling) in progress(settings(cfg).items()):
        requests = [replace(r, sampling=replace(r.sampling, **{k: v + (getattr(r.sampling, k) if k == "seed" else 0)
                                                                   for k, v in sampling.items()}), **knobs)
                    for r in base]
        done, seconds = serve(model, preset, requests, kv_bytes, decode)
        out[name] = {"lengths": [len(d.tokens) for d in done], "latencies": [d.latency for d in done],
                     "cut": sum(d.finish_reason == "length" for d in done), "seconds": seconds,
                     "output_tokens_per_s": sum(len(d.tokens) for d in done) / seconds,
                     "tokens_per_s_per_request": float(np.mean([len(d.tokens) / d.latency for d in done]))}
    return {"prompt_lengths": [len(p) for p in prompts], "prompts": prompts, "settings": out, "rows": table(out)}


def table(served: dict[str, dict]) -> list[dict]:
    """One row per setting but full: D's tails, outliers, the two tests, mean lengths and latencies."""
    full = served["full"]["lengths"]
    null = [abs(x) for x in shifts(full, served[RESEEDED]["lengths"])[0]]
    rows = []
    for name, s in served.items():
        if name == "full":
            continue
        d, dropped = shifts(full, s["lengths"])
        paired = [(f, o) for f, o in zip(full, s["lengths"]) if f != o]
        wilcoxon = stats.wilcoxon([f for f, _ in paired], [o for _, o in paired]).pvalue if paired else 1.0
        spread = (stats.mannwhitneyu([abs(x) for x in d], null, alternative="greater").pvalue
                  if name != RESEEDED and d and null else None)
        rows.append({"setting": name, "samples": len(d), "outliers": dropped,
                     "same_length": float(np.mean([f == o for f, o in zip(full, s["lengths"])]) * 100),
                     "longer_by_half": float(np.mean([x <= -50 for x in d]) * 100) if d else 0.0,
                     "shorter_by_half": float(np.mean([x >= 50 for x in d]) * 100) if d else 0.0,
                     "mean_D": float(np.mean(d)) if d else 0.0, "mean_length": float(np.mean(s["lengths"])),
                     "full_mean_length": float(np.mean(full)), "wilcoxon_p": float(wilcoxon),
                     "more_than_resampling_p": None if spread is None else float(spread),
                     "latency_p50": float(np.median(s["latencies"])),
                     "full_latency_p50": float(np.median(served["full"]["latencies"])),
                     "tokens_per_s_per_request": s["tokens_per_s_per_request"],
                     "full_tokens_per_s_per_request": served["full"]["tokens_per_s_per_request"],
                     "output_tokens_per_s": s["output_tokens_per_s"],
                     "full_output_tokens_per_s": served["full"]["output_tokens_per_s"]})
    return rows


BASELINES = ("full, temp 0.9", "full, temp 1.1", RESEEDED)


def shifted(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The compressed settings that change lengths more than sampling again (Mann-Whitney p < 0.05), and of those
    the ones whose answers are longer, systematically (mean D < 0, Wilcoxon p < 0.05)."""
    beyond = [r for r in rows if r["setting"] not in BASELINES and r["more_than_resampling_p"] is not None
              and r["more_than_resampling_p"] < 0.05]
    return ([r["setting"] for r in beyond],
            [r["setting"] for r in beyond if r["mean_D"] < 0 and r["wilcoxon_p"] < 0.05])


def finding(report: dict, device: str) -> str:
    """The study's claim, the shift each setting makes against the full cache's natural variance, and latency."""
    rows = {r["setting"]: r for r in report["rows"]}
    compressed = [r for name, r in rows.items() if name not in BASELINES]
    n = len(report["prompt_lengths"])
    lines = ["The study's finding (2): compressed KV caches change how long answers are, often making them longer, "
             "which can eat the per-token speedup end to end.",
             f"Measured here ({device}; {n} prompts from held-out plays, each answer one speech, temperature 1, "
             f"the same seeds in every setting): sampling again with other seeds leaves "
             f"{rows[RESEEDED]['same_length']:.1f}% of answers as long as before and makes "
             f"{rows[RESEEDED]['longer_by_half']:.1f}% longer by half and "
             f"{rows[RESEEDED]['shorter_by_half']:.1f}% shorter by half (temperature 0.9: "
             f"{rows['full, temp 0.9']['mean_length']:.1f} tokens on average, 1.1: "
             f"{rows['full, temp 1.1']['mean_length']:.1f}, full: {rows[RESEEDED]['full_mean_length']:.1f})."]
    beyond, longer = shifted(report["rows"])
    for r in compressed:
        p = r["more_than_resampling_p"]
        verdict = "more than sampling again does" if r["setting"] in beyond else "no more than sampling again"
        lines.append(f"{r['setting']}: {r['mean_length']:.1f} tokens on average, {r['same_length']:.1f}% of "
                     f"answers as long as full's, {r['longer_by_half']:.1f}% longer "
                     f"by half, {r['shorter_by_half']:.1f}% shorter (Wilcoxon p = {r['wilcoxon_p']:.2g}; Mann-"
                     f"Whitney p = {'n/a' if p is None else f'{p:.2g}'} against other seeds: {verdict})"
                     + f"; median latency {r['latency_p50'] / r['full_latency_p50']:.2f}x full's, output tokens/s "
                       f"{r['output_tokens_per_s'] / r['full_output_tokens_per_s']:.2f}x.")
    if longer:
        lines.append(f"Holds here for {', '.join(longer)}: longer answers beyond the full cache's own variance.")
    elif beyond:
        lines.append(f"Partly: {', '.join(beyond)} change lengths beyond the full cache's own variance, but not "
                     f"systematically longer.")
    else:
        lines.append("Does not hold here: no compressed setting changes answer lengths more than sampling the full "
                     "cache again with other seeds does.")
    return " ".join(lines)


def plot(report: dict, out) -> list:
    """D per setting (histogram and KDE, log density, other seeds' D in grey behind), and the latency CDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = report["settings"]
    full = served["full"]["lengths"]
    names = [n for n in served if n != "full"]
    null, _ = shifts(full, served[RESEEDED]["lengths"])
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False, sharex=True)
    bins = np.linspace(-OUTLIER, 100, 31)
    grid = np.linspace(-OUTLIER, 100, 200)
    for ax, name in zip(axes.flat, names):
        d, dropped = shifts(full, served[name]["lengths"])
        ax.hist(null, bins=bins, density=True, color="0.85", label="other seeds")
        ax.hist(d, bins=bins, density=True, alpha=0.6, label=name)
        if len(set(d)) > 1:
            ax.plot(grid, stats.gaussian_kde(d)(grid), color="C3", lw=1)
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 1)  # a spike at D = 0 (the same answer) sends a KDE's tails far below any bar
        ax.set_title(f"{name} ({dropped} outliers)", fontsize=8)
        ax.axvline(0, color="k", lw=0.6)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("D (%): < 0 longer than full", fontsize=8)
    fig.suptitle("answer length shift D against the full cache (grey: the full cache with other seeds)")
    paths = [out / "shift.png"]
    fig.savefig(paths[0], dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, s) in enumerate(served.items()):  # up to 20 settings in colors of their own
        latency = np.sort(s["latencies"])
        ax.plot(latency, np.arange(1, len(latency) + 1) / len(latency), label=name,
                ls="--" if name in BASELINES else "-", color=plt.cm.tab20(i % 20))
    ax.set(xlabel="end-to-end latency (s), every request arriving at once", ylabel="fraction of requests",
           title="end-to-end latency per setting, same KV memory")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    paths.append(out / "latency_cdf.png")
    fig.savefig(paths[1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths
