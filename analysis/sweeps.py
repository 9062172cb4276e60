"""`python analyze.py analysis=sweeps`: prefill and decode throughput of every cache preset against `full`, over
prompt lengths at a fixed batch and over batches at a fixed length (the MLSys 2025 study's Figure 1), with its
quantized presets on two kernel paths.

The study's finding (1): under production kernels compressed caches can lose throughput, and gain only at heavy KV
load (large batches, long contexts); its quantized caches lose most where they dequantize the whole cache before
attending. Here every preset runs through our kernels (`cache.attend=fused`: the decode kernel reads blocks and
int codes where they lie) and the quantized ones also through the dequantize-then-attend path (`attend=naive`).

Settings: each preset at the study's sparse budget (512 kept tokens, of them 64 sinks for StreamingLLM or 64 heavy
hitters for H2O; KIVI with groups of 32 and a residual of 128, its defaults here) and at a budget scaled to our
models' context (`scaled_budget`); `naive` lists the presets also run with attend=naive (GEAR's codes are
decoded before attending on both paths: no kernel reads them). Points: `batch` x every length of `lengths`, every
batch of `batches` x `length`, and the coarse grid `grid_batches` x `grid_lengths` for the heatmap. At each point
every setting runs back to back, so slow drifts of a shared machine touch all of them alike, and full runs first
and again last: the faster of its two runs is the baseline, so no speedup flatters compression.
"""

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from analysis.serving_view import ServingViewConfig
from analysis.throughput import measure
from cache.presets import PRESETS, CacheSpec
from toymodel.ranges import POSITIVE, check_ranges


@dataclass
class SweepsConfig:
    presets: list[str] = field(default_factory=lambda: ["full", "quant8", "quant4", "kivi4", "kivi2", "gear4",
                                                        "sink", "h2o", "snapkv", "kvcompress", "minicache"])
    naive: list[str] = field(default_factory=lambda: ["quant8", "quant4", "kivi4", "kivi2", "gear4"])
    budget: int = field(default=512, metadata=POSITIVE)  # the study's sparse budget: tokens kept per KV head
    scaled_budget: int | None = field(default=128, metadata=POSITIVE)  # and one scaled to our context (None: no)
    batch: int = field(default=4, metadata=POSITIVE)  # the fixed batch of the length sweep
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    length: int = field(default=1024, metadata=POSITIVE)  # the fixed length of the batch sweep
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    grid_batches: list[int] = field(default_factory=lambda: [1, 4, 16])
    grid_lengths: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    steps: int = field(default=8, metadata={"range": "[3, inf)"})  # decode steps timed per point
    serving: ServingViewConfig = field(default_factory=ServingViewConfig)  # the engine at a fixed KV memory

    def __post_init__(self) -> None:
        check_ranges(self, "sweeps")
        unknown = [p for p in self.presets + self.naive if p not in PRESETS]
        if unknown:
            raise ValueError(f"sweeps: unknown presets {unknown}; choose among {', '.join(PRESETS)}")
        if "full" not in self.presets:
            raise ValueError("sweeps.presets must include full: every speedup is against it")


LARGE = dict(batch=8, lengths=[256, 512, 1024, 2048, 4096, 8192], batches=[1, 2, 4, 8, 16, 32, 64],
             grid_batches=[1, 4, 16, 64], grid_lengths=[256, 1024, 4096, 8192])  # the study's scale and beyond: a GPU
QUICK = dict(presets=["full", "quant4", "sink"], naive=["quant4"], budget=32, scaled_budget=None, batch=2,
             lengths=[64, 128], length=64, batches=[1, 2], grid_batches=[1, 2], grid_lengths=[64, 128], steps=3)


def study_spec(spec: CacheSpec, budget: int) -> CacheSpec:
    """An evicting preset at `budget` kept tokens, an eighth of them StreamingLLM's sinks or H2O's heavy hitters
    (64 of 512, the study's split); the observation windows of SnapKV and KV-Compress unchanged."""
    if spec.policy == "sink":
        return replace(spec, budget=budget, sink=budget // 8, window=0)
    if spec.policy == "h2o":
        return replace(spec, budget=budget, window=budget - budget // 8)
    return replace(spec, budget=budget)


def settings(cfg: SweepsConfig) -> dict[str, CacheSpec]:
    """Setting name -> spec: `preset`, `preset@budget` for evicting ones, `preset naive` on the naive path."""
    out = {}
    for name in cfg.presets:
        spec = PRESETS[name]
        if spec.policy == "full":
            out[name] = spec
        else:
            for budget in [cfg.budget] + ([cfg.scaled_budget] if cfg.scaled_budget else []):
                out[f"{name}@{budget}"] = study_spec(spec, budget)
        if name in cfg.naive:
            out[f"{name} naive"] = replace(spec, attend="naive")
    return out


def points(cfg: SweepsConfig) -> list[tuple[int, int]]:
    """(batch, length) pairs to measure, each once, in order."""
    wanted = [(cfg.batch, T) for T in cfg.lengths] + [(B, cfg.length) for B in cfg.batches]
    wanted += [(B, T) for B in cfg.grid_batches for T in cfg.grid_lengths]
    return sorted(set(wanted), key=lambda p: (p[0] * p[1], p))


def run(model: torch.nn.Module, cfg: SweepsConfig, progress) -> list[dict]:
    """Every setting at every point: one row each (setting, preset, path, batch, length, throughputs, bytes)."""
    rows, todo = [], settings(cfg)
    for spec in todo.values():  # warm-up, not recorded: kernels load, the allocator grows
        measure(model, spec, 1, min(points(cfg))[1], 3)
    for batch, length in progress(points(cfg)):
        order = ["full"] + [name for name in todo if name != "full"]
        here = {name: measure(model, todo[name], batch, length, cfg.steps) for name in order}
        again = measure(model, todo["full"], batch, length, cfg.steps)
        here["full"] = {k: max(here["full"][k], again[k]) for k in again}
        for name, row in here.items():
            spec = todo[name]
            rows.append({"setting": name, "preset": spec.name, "family": family(spec), "attend": spec.attend,
                         "budget": spec.budget, "batch": batch, "length": length, **row,
                         "prefill_speedup": row["prefill_tokens_per_s"] / here["full"]["prefill_tokens_per_s"],
                         "decode_speedup": row["decode_tokens_per_s"] / here["full"]["decode_tokens_per_s"]})
    return rows


FAMILIES = ("quantized, fused", "quantized, naive", "sparse", "merged")


def family(spec: CacheSpec) -> str | None:
    """Which kind of compression a setting is (None: full)."""
    if spec.merge != "none":
        return "merged"
    if spec.policy != "full":
        return "sparse"
    if spec.codec not in ("fp", "fp16"):  # no kernel reads GEAR's codes: both of its paths decode them first
        return f"quantized, {'naive' if spec.codec.startswith('gear') else spec.attend}"
    return None


def verdict(light: list[float], heavy: list[float], everywhere: list[float]) -> str:
    """The claim, "loses at light load, gains only at heavy load", against one family's decode speedups."""
    if max(everywhere) <= 1:
        return "never faster than full here, at any load: the loss holds, the gain at heavy load does not"
    if min(light) < 1 < max(heavy):
        return "holds: slower than full at the lightest load, faster at the heaviest"
    if min(light) >= 1:
        return "does not hold: not slower than full even at the lightest load"
    return "partly: slower at the lightest load, and not faster at the heaviest"


def finding(rows: list[dict], device: str) -> str:
    """The study's claim, what we measured per family of settings, and whether it holds here: from the rows."""
    load = lambda r: r["batch"] * r["length"]  # noqa: E731  tokens in the cache: the KV load
    light, heavy = min(map(load, rows)), max(map(load, rows))
    lines = ["The study's finding (1): compressed KV caches can lose throughput under production kernels and gain "
             "only at heavy KV load (large batches, long contexts).",
             f"Measured here ({device}), decode speedup against full at the lightest load ({light:,} cached tokens) "
             f"and at the heaviest ({heavy:,}):"]
    for name in FAMILIES:
        mine = [r for r in rows if r["family"] == name]
        if not mine:
            continue
        at = lambda n: [r["decode_speedup"] for r in mine if load(r) == n]  # noqa: E731
        best = max((r for r in mine if load(r) == heavy), key=lambda r: r["decode_speedup"])
        n = len({r["setting"] for r in mine})
        lines.append(f"{name} ({n} setting{'s' * (n > 1)}): {min(at(light)):.2f}-"
                     f"{max(at(light)):.2f}x light, {min(at(heavy)):.2f}-{max(at(heavy)):.2f}x heavy (best "
                     f"{best['setting']}); {verdict(at(light), at(heavy), [r['decode_speedup'] for r in mine])}.")
    by = {(r["setting"], r["batch"], r["length"]): r for r in rows}
    ratios = [r["decode_tokens_per_s"] / by[(r["setting"].removesuffix(" naive"), r["batch"], r["length"])][
        "decode_tokens_per_s"] for r in rows if r["setting"].endswith(" naive")]  # naive / fused, point by point
    if ratios:
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        lines.append(f"The same presets dequantizing then attending decode at {min(ratios):.2f}-{max(ratios):.2f}x "
                     f"the speed of the fused kernels (geometric mean {mean:.2f}x)"
                     + (": decoding the whole cache every step is most of what quantization loses." if mean < 0.8
                        else "."))
    full = sorted((r for r in rows if r["setting"] == "full" and r["batch"] == min(x["batch"] for x in rows)),
                  key=lambda r: r["length"])
    if len(full) > 1:
        lines.append(f"Why the load matters: full's decode at batch {full[0]['batch']} falls from "
                     f"{full[0]['decode_tokens_per_s']:,.0f} to {full[-1]['decode_tokens_per_s']:,.0f} tokens/s "
                     f"between {full[0]['length']:,} and {full[-1]['length']:,} cached tokens: only where reading "
                     f"the cache is a large part of a step can a smaller cache pay for its own extra work.")
    return " ".join(lines)


def plot(rows: list[dict], cfg: SweepsConfig, out: Path) -> list[Path]:
    """Throughput and speedup against length and against batch, and the decode speedup heatmaps; PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["setting"] for r in rows))
    paths = []
    for axis, fixed, fixed_value, values in (("length", "batch", cfg.batch, cfg.lengths),
                                             ("batch", "length", cfg.length, cfg.batches)):
        fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
        for i, name in enumerate(names):
            line = sorted((r for r in rows if r["setting"] == name and r[fixed] == fixed_value and r[axis] in values),
                          key=lambda r: r[axis])
            style = "--" if name.endswith("naive") else "-"
            for ax, key in zip(axes.flat, ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_speedup",
                                           "decode_speedup")):
                ax.plot([r[axis] for r in line], [r[key] for r in line], style, marker="o", ms=3, label=name,
                        color=plt.cm.tab20(i % 20))
                ax.set_title(key.replace("_", " "))
                ax.set_xscale("log", base=2)
        for ax in axes[1]:
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xlabel(axis)
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.suptitle(f"throughput against {axis}, {fixed} = {fixed_value} (dashed: dequantize then attend)")
        paths.append(out / f"{axis}.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    paths.append(heatmaps(rows, cfg, names, out / "heatmap.png"))
    return paths


def heatmaps(rows: list[dict], cfg: SweepsConfig, names: list[str], path: Path) -> Path:
    """Decode speedup against full over the grid, one panel per setting; a cell where it loses is marked x."""
    import matplotlib.pyplot as plt

    names = [n for n in names if n != "full"]
    cols = min(4, len(names))
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(3.2 * cols, 2.8 * -(-len(names) // cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        grid = [[next((r["decode_speedup"] for r in rows if r["setting"] == name and r["batch"] == B
                       and r["length"] == T), math.nan) for T in cfg.grid_lengths] for B in cfg.grid_batches]
        ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.5, origin="lower")
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                ax.text(j, i, f"{v:.2f}" + (" x" if v < 1 else ""), ha="center", va="center", fontsize=7,
                        color="white" if not 0.65 < v < 1.35 else "black")  # readable on the darkest cells
        ax.set_xticks(range(len(cfg.grid_lengths)), cfg.grid_lengths, fontsize=7)
        ax.set_yticks(range(len(cfg.grid_batches)), cfg.grid_batches, fontsize=7)
        ax.set_title(name, fontsize=8)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.suptitle("decode speedup against full (rows: batch, columns: prompt length; x: compression loses)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
