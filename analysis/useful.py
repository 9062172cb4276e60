"""`python analyze.py analysis=useful`: one number that joins speed, length and failures (beyond the study).

Per setting the engine serves (analysis=length's report: output tokens/s at one KV memory), useful tokens/s =
output tokens/s x (1 - excess) x (1 - broken), where

    excess  the share of its output tokens that exist only because an answer grew longer than the full cache's
            answer to the same prompt: sum over prompts of max(0, L - L_full), over the sum of L
    broken  the share of qualifying task samples it breaks at theta (analysis=negatives' report, the setting with
            the same preset and budget; 0 where none matches, and said so)

Raw speed ranks the settings by output tokens/s against full; useful tokens/s ranks them again. The two reports may
come from different models (the length analysis serves the analysed model's plays; the negatives come from the
long-context model that retrieves): each discount is measured where its behaviour exists.
"""

from analysis.length import BASELINES
from analysis.negatives import by_sample, negatives, qualifying

THETA = 0.10


def excess_share(full: list[int], other: list[int]) -> float:
    """The share of `other`'s tokens beyond the full cache's answer length, prompt by prompt."""
    return sum(max(0, o - f) for f, o in zip(full, other, strict=True)) / max(sum(other), 1)


def match(negatives_report: dict, setting: str) -> str | None:
    """The negatives setting of the same preset and budget as an engine setting ("quant4", "kvcompress 64")."""
    preset, _, budget = setting.partition(" ")
    for name in negatives_report["sets"]:
        if name.split("@")[0] != preset:
            continue
        if not budget or negatives_report.get("budgets", {}).get(name) == int(budget):
            return name
    return None


def broken_share(negatives_report: dict, name: str) -> float:
    scores, kinds = by_sample(negatives_report["rows"])
    eligible = qualifying(scores, kinds)
    return len(negatives(scores, kinds, negatives_report["sets"][name], THETA)) / max(len(eligible), 1)


def run(length_report: dict, negatives_report: dict) -> list[dict]:
    """One row per engine setting: raw and useful tokens/s against full's, and their ranks."""
    served = length_report["settings"]
    full = served["full"]
    rows = []
    for name, s in served.items():
        if name in BASELINES or s["latencies"] is None:  # the baselines, and any setting a report holds untimed
            continue
        matched = None if name == "full" else match(negatives_report, name)
        excess = 0.0 if name == "full" else excess_share(full["lengths"], s["lengths"])
        broken = broken_share(negatives_report, matched) if matched else 0.0
        useful = s["output_tokens_per_s"] * (1 - excess) * (1 - broken)
        rows.append({"setting": name, "negatives_setting": matched, "excess": excess, "broken": broken,
                     "output_tokens_per_s": s["output_tokens_per_s"], "useful_tokens_per_s": useful,
                     "raw_speedup": s["output_tokens_per_s"] / full["output_tokens_per_s"],
                     "useful_speedup": useful / full["output_tokens_per_s"]})
    for key in ("raw_speedup", "useful_speedup"):
        for rank, row in enumerate(sorted(rows, key=lambda r: -r[key]), start=1):
            row[key.replace("speedup", "rank")] = rank
    return rows


def finding(rows: list[dict]) -> str:
    """Where the two rankings disagree, from the rows."""
    by_raw = [r["setting"] for r in sorted(rows, key=lambda r: r["raw_rank"])]
    by_useful = [r["setting"] for r in sorted(rows, key=lambda r: r["useful_rank"])]
    lines = ["Beyond the study: output tokens/s discounted for tokens an answer adds beyond the full cache's and for "
             f"task samples a setting breaks (theta = {THETA:.0%}).",
             "By raw speed: " + ", ".join(f"{r['setting']} {r['raw_speedup']:.2f}x" for r in
                                          sorted(rows, key=lambda r: r["raw_rank"])) + ".",
             "By useful tokens/s: " + ", ".join(f"{r['setting']} {r['useful_speedup']:.2f}x (excess "
                                                f"{r['excess']:.0%}, broken {r['broken']:.0%})" for r in
                                                sorted(rows, key=lambda r: r["useful_rank"])) + "."]
    unmatched = [r["setting"] for r in rows if r["setting"] != "full" and r["negatives_setting"] is None]
    if unmatched:
        lines.append(f"No task scores for {', '.join(unmatched)}: counted as breaking nothing.")
    lines.append("The rankings agree." if by_raw == by_useful else
                 f"They disagree: {', '.join(n for n, m in zip(by_raw, by_useful) if n != m)} move.")
    return " ".join(lines)


def plot(rows: list[dict], path):
    """Raw and useful tokens/s against full's, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(x - 0.2, [r["raw_speedup"] for r in rows], 0.4, label="output tokens/s")
    ax.bar(x + 0.2, [r["useful_speedup"] for r in rows], 0.4, label="useful tokens/s")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, [r["setting"] for r in rows])
    ax.set(ylabel="against full's output tokens/s", title="raw and useful throughput at one KV memory")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
