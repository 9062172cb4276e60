"""`python analyze.py analysis=negatives`: the samples a compressed cache breaks, hidden by a small average loss (the
MLSys 2025 study's finding (3), its Algorithm 1), and the tool that finds them in any table of scores.

The rule, per sample s of task t, for a set P of settings, at threshold theta:

    s is negative  <=>  full(s) > 0,  full(s) >= median of full's scores on t,  and
                        score_p(s) <= (1 - theta) x full(s) for every p in P

A score equal to the median qualifies ("at least"); the median of an even count is the mean of its two middle
scores (numpy's). full(s) > 0 guards the case where a task's median full score is 0: without it, every sample of
that task would be "negative" at every theta. Each theta counts each sample once (the study's sweep counted one
dataset twice). Sets: each setting alone, every quantized setting together ("Quant (C)": negative for all of
them) and every sparse one together ("Sparse (C)").

Scores come from the task suite (corpus/tasks.py) through each preset at kvpress's compression ratios (0.25, 0.5,
0.75, 0.875 of the cache evicted: a budget of (1 - ratio) x the context for the sparse presets; the bits that
save as much for the quantized ones: 8 for 0.5, 4 for 0.75, 2 for 0.875), on `ckpt` (the shipped long-context
model by default). The question sits at the end of every prompt: the sparse presets here keep it (it falls in
their recent window or observation window), the quantized ones encode it like every other token. Or bring your
own: `scores=<file>` reads a CSV or JSONL table with the columns sample_id, task, task_type, preset, score (one row
per sample and preset; the reference preset is named `full`).
"""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.presets import PRESETS, at_budget, build_cache
from corpus.tasks import make_samples
from serving.tasks import run_tasks
from toymodel.ranges import POSITIVE, check_ranges

COLUMNS = ("sample_id", "task", "task_type", "preset", "score")
THETAS = (0.01, 0.02, 0.04, 0.08, 0.10, 0.16, 0.24, 0.32)
BITS = {0.5: ["quant8"], 0.75: ["quant4", "kivi4"], 0.875: ["kivi2"]}  # ratio -> presets saving that share


@dataclass
class NegativesConfig:
    scores: str | None = None  # a score table of your own (CSV or JSONL); None: run the task suite here
    ckpt: str | None = "ctx1k-keys"  # the model the task suite runs on (None: analyze.py's ckpt)
    sparse: list[str] = field(default_factory=lambda: ["sink", "h2o", "snapkv", "kvcompress"])
    ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.875])
    tasks: list[str] = field(default_factory=lambda: ["passkey", "multikey", "recall"])
    length: int = field(default=512, metadata=POSITIVE)  # prompt tokens
    samples: int = field(default=8, metadata=POSITIVE)  # per task and depth (5 depths)
    key_digits: int = field(default=2, metadata={"range": "[1, 9]"})  # what the shipped model retrieves

    def __post_init__(self) -> None:
        check_ranges(self, "negatives")
        bad = [r for r in self.ratios if not 0 < r < 1]
        if bad:
            raise ValueError(f"negatives.ratios={self.ratios}: each is the share of the cache evicted, in (0, 1)")
        unknown = [p for p in self.sparse if p not in PRESETS or PRESETS[p].policy == "full"]
        if unknown:
            raise ValueError(f"negatives.sparse: {unknown} are not evicting presets; choose among "
                             f"{', '.join(n for n, s in PRESETS.items() if s.policy != 'full')}")


QUICK = dict(ckpt=None, sparse=["sink"], ratios=[0.5, 0.75], tasks=["passkey"], length=256, samples=1)


def settings(cfg: NegativesConfig) -> dict[str, tuple[str, object]]:
    """Setting name -> (family, CacheSpec): full, then each sparse preset and each quantized one per ratio."""
    out = {"full": ("full", PRESETS["full"])}
    for ratio in cfg.ratios:
        budget = max(1, round((1 - ratio) * cfg.length))
        for name in cfg.sparse:
            out[f"{name}@{ratio:g}"] = ("sparse", at_budget(PRESETS[name], budget))
        for name in BITS.get(ratio, []):
            out[f"{name}@{ratio:g}"] = ("quant", PRESETS[name])
    return out


def score_table(model: torch.nn.Module, cfg: NegativesConfig, held_out: np.ndarray, enc, progress) -> list[dict]:
    """Every sample through every setting: one row per (sample, setting)."""
    weight = next(model.parameters())
    samples = make_samples(enc, held_out, cfg.tasks, [cfg.length], [0.0, 0.25, 0.5, 0.75, 1.0], cfg.samples,
                           2024, model.config.block_size, cfg.key_digits)
    rows = []
    for name, (family, spec) in progress(list(settings(cfg).items())):
        new_cache = lambda B, T, spec=spec: build_cache(spec, model.config, B, weight.device,  # noqa: E731
                                                         weight.dtype, model.backend.name, max_tokens=T)
        results, _ = run_tasks(model, samples, new_cache, enc, progress=False)
        rows += [{"sample_id": i, "task": r["task"], "task_type": r["task_type"], "preset": name,
                  "family": family, "score": float(r["score"])} for i, r in enumerate(results)]
    return rows


def read_scores(path: str) -> list[dict]:
    """A score table of one's own: CSV with a header, or JSONL; raises ValueError naming the line and column."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"negatives.scores={path} does not exist; give a CSV or JSONL file with columns "
                                f"{', '.join(COLUMNS)}")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        raw = list(csv.DictReader(text.splitlines()))
    rows = []
    for n, row in enumerate(raw, start=2 if file.suffix != ".jsonl" else 1):
        missing = [c for c in COLUMNS if c not in row or row[c] in (None, "")]
        if missing:
            raise ValueError(f"negatives.scores line {n}: missing {missing}; every row needs {', '.join(COLUMNS)}")
        try:
            score = float(row["score"])
        except ValueError:
            raise ValueError(f"negatives.scores line {n}: score={row['score']!r} is not a number")
        rows.append({**{c: str(row[c]) for c in COLUMNS[:4]}, "score": score, "family": row.get("family", "")})
    if not any(r["preset"] == "full" for r in rows):
        raise ValueError(f"negatives.scores={path} has no rows of preset 'full': the reference every rule compares "
                         f"against; name the uncompressed run full")
    if all(r["preset"] == "full" for r in rows):
        raise ValueError(f"negatives.scores={path} holds only preset 'full'; add the compressed runs' rows")
    with_full = {(r["task"], r["sample_id"]) for r in rows if r["preset"] == "full"}
    orphans = sorted({(r["task"], r["sample_id"]) for r in rows} - with_full)
    if orphans:
        raise ValueError(f"negatives.scores={path}: {len(orphans)} samples have no 'full' score, e.g. task "
                         f"{orphans[0][0]!r} sample {orphans[0][1]!r}; every sample needs the reference's score")
    return rows


def by_sample(rows: list[dict]) -> tuple[dict, dict]:
    """(sample -> {preset: score}, sample -> (task, task_type)), a sample keyed by (task, sample_id)."""
    scores, kinds = {}, {}
    for r in rows:
        key = (r["task"], r["sample_id"])
        scores.setdefault(key, {})[r["preset"]] = r["score"]
        kinds[key] = (r["task"], r["task_type"])
    return scores, kinds


def qualifying(scores: dict, kinds: dict) -> set:
    """The samples the rule may call negative: full score above 0 and at least its task's median full score."""
    full = {}
    for key, s in scores.items():
        full.setdefault(kinds[key][0], []).append(s["full"])
    median = {task: float(np.median(v)) for task, v in full.items()}
    return {key for key, s in scores.items() if s["full"] > 0 and s["full"] >= median[kinds[key][0]]}


def negatives(scores: dict, kinds: dict, presets: list[str], theta: float) -> set:
    """The samples negative at `theta` for every preset in `presets` (each sample at most once)."""
    return {key for key in qualifying(scores, kinds)
            if all(p in scores[key] and scores[key][p] <= (1 - theta) * scores[key]["full"] for p in presets)}


def groups(rows: list[dict]) -> dict[str, list[str]]:
    """Each setting alone, and the quantized and sparse ones together where a table names families."""
    presets = list(dict.fromkeys(r["preset"] for r in rows if r["preset"] != "full"))
    out = {p: [p] for p in presets}
    for family, name in (("quant", "Quant (C)"), ("sparse", "Sparse (C)")):
        members = list(dict.fromkeys(r["preset"] for r in rows if r.get("family") == family))
        if len(members) > 1:
            out[name] = members
    return out


def analyse(rows: list[dict]) -> dict:
    """Negatives per set and theta, by task type at 10%, and the mean score per task type and preset."""
    scores, kinds = by_sample(rows)
    sets = groups(rows)
    counts = {name: {f"{t:g}": len(negatives(scores, kinds, members, t)) for t in THETAS}
              for name, members in sets.items()}
    at_10 = {name: {} for name in sets}
    for name, members in sets.items():
        for key in negatives(scores, kinds, members, 0.10):
            kind = kinds[key][1]
            at_10[name][kind] = at_10[name].get(kind, 0) + 1
    means = {}
    for r in rows:
        means.setdefault(r["preset"], {}).setdefault(r["task_type"], []).append(r["score"])
    mean_scores = {p: {k: float(np.mean(v)) for k, v in t.items()} for p, t in means.items()}
    return {"samples": len(scores), "qualifying": len(qualifying(scores, kinds)), "sets": sets, "counts": counts,
            "by_type_at_10": at_10, "mean_scores": mean_scores,
            "mean_score_rows": [{"preset": p, **t} for p, t in mean_scores.items()]}  # the table per task type


def hidden(report: dict) -> list[str]:
    """The sets that break samples at theta = 10% while their mean score stays within 5% of full's."""
    means = report["mean_scores"]
    full = np.mean(list(means["full"].values()))
    return [n for n in report["sets"] if n in means and report["counts"][n]["0.1"] > 0
            and abs(np.mean(list(means[n].values())) - full) <= 0.05 * max(abs(full), 1e-9)]


def finding(report: dict) -> str:
    """The study's claim, how many samples break per set at 10%, which task types, and the average it hides."""
    counts, types, means = report["counts"], report["by_type_at_10"], report["mean_scores"]
    lines = ["The study's finding (3): a small average accuracy loss hides negative samples, concentrated in some task "
             "types.",
             f"Measured here ({report['source']}): {report['samples']} samples, {report['qualifying']} of them "
             f"qualifying (full score above 0 and at least its task's median); at theta = 10%:"]
    full_mean = np.mean([v for v in means["full"].values()])
    for name in report["sets"]:
        mean = np.mean(list(means[name].values())) if name in means else None
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(types[name].items(), key=lambda kv: -kv[1])) or "none"
        lines.append(f"{name} {counts[name]['0.1']} negative ({kinds})"
                     + (f", mean score {mean:.3f} against full's {full_mean:.3f}" if mean is not None else "") + ";")
    if hidden(report):
        lines.append(f"Holds here: {', '.join(hidden(report))} stay within 5% of full's mean score yet break "
                     f"samples.")
    elif any(counts[n]["0.1"] for n in report["sets"]):
        lines.append("Partly: samples break, but every setting that breaks them also loses more than 5% on average, "
                     "so here the average does not hide them.")
    else:
        lines.append("Does not hold here: no setting breaks a qualifying sample at 10%.")
    return " ".join(lines)


def plot(report: dict, out: Path) -> list[Path]:
    """Negatives against theta per set; pies of negatives by task type at 10%: the combined sets', or where they
    break nothing, the two settings that break the most."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, name in enumerate(report["sets"]):
        combined = name.endswith("(C)")
        ax.plot([t * 100 for t in THETAS], [report["counts"][name][f"{t:g}"] for t in THETAS], marker="o", ms=3,
                lw=2.2 if combined else 1, ls="-" if combined else "--", label=name, color=plt.cm.tab20(i % 20))
    ax.set(xlabel="theta (%)", ylabel="negative samples", title="negative samples against the threshold theta")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    paths = [out / "negatives.png"]
    fig.savefig(paths[0], dpi=100, bbox_inches="tight")
    plt.close(fig)
    at_10 = lambda n: report["counts"][n]["0.1"]  # noqa: E731
    combined = [n for n in report["sets"] if n.endswith("(C)") and at_10(n)]  # else the two that break the most
    combined = combined or sorted(report["sets"], key=at_10, reverse=True)[:2]
    fig, axes = plt.subplots(1, len(combined), figsize=(4 * len(combined), 4), squeeze=False)
    for ax, name in zip(axes[0], combined):
        kinds = report["by_type_at_10"][name]
        if kinds:
            ax.pie(list(kinds.values()), labels=list(kinds), autopct="%d%%")
        else:
            ax.text(0.5, 0.5, "no negatives", ha="center", va="center")
            ax.axis("off")
        ax.set_title(f"{name}: {sum(kinds.values())} negatives at 10%", fontsize=9)
    paths.append(out / "by_task_type.png")
    fig.savefig(paths[1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths
