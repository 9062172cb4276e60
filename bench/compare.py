"""Presets side by side: the reports of one `python infer.py --multirun ...` sweep, drawn and tabulated.

    python infer.py --multirun mode=generate,ppl cache=full,sink,minicache,quant4,gear4
    python infer.py --multirun mode=tasks cache=full,sink,quant4          # the task suite, preset by preset
    python -m bench.compare runs/compare/<timestamp>        # the sweep's folder (conf/infer.yaml, hydra.sweep.dir)

Reads every infer.py report under the folder (the latest per preset and mode; a report's first batch) and writes
next to them:

    step_time.png         time per generated token over the generation, one line per preset (generate reports)
    kv_bytes.png          the cache's bytes over the generation
    quality_vs_bytes.png  perplexity of held-out text through the cache (ppl reports) against KV bytes per token
    decode_speed.png      decode tokens/s, a bar per preset
    needles.png           retrieval accuracy by context length and needle depth, a panel per preset (tasks reports)
    compare.md            one table of the figures per preset, and one of task scores per task type with tasks
                          reports;  compare.json  the same numbers

Bytes per token = kv_bytes / (batch * tokens seen): what one token of one sequence costs over all layers, K and V,
with scales, residuals and retained tokens (cache.figures()). A step's time is its wall time, as
serving.generate.generate(record_steps=True) notes it; the first new token comes out of prefill, so the lines start
at the second. A sweep without ppl reports has no quality picture (the script says how to get one).
"""

import argparse
import json
import statistics
from pathlib import Path

from bench.common import write_json
from serving.tasks import plot_needles

TASK_TYPES = ("retrieval", "tracking", "copy", "language")  # the summary's tasks_type_* figures (serving/tasks.py)


def read_reports(folder: Path) -> dict[str, dict[str, dict]]:
    """{preset: {mode: report}} for every infer.py report under folder, the latest of each (names sort by time),
    presets in the order the sweep ran them. Raises FileNotFoundError when there is none."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(folder.rglob("*.json"), key=lambda p: p.name):
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not {"config", "batches"} <= report.keys() or not report["batches"]:
            continue  # compare.json, or another tool's file
        found.setdefault(report["config"]["cache"]["name"], {})[report["config"]["mode"]] = report
    if not found:
        raise FileNotFoundError(f"no infer.py report under {folder}; run python infer.py --multirun cache=full,sink "
                                f"and pass the folder it names (runs/compare/<timestamp>)")
    return found


def bytes_per_token(batch: dict) -> float:
    """KV bytes held per token seen, per sequence."""
    return batch["kv_bytes"] / (batch["batch_size"] * batch["tokens_seen"])


def summarize(reports: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """One row of numbers per preset from its generate and ppl reports (None where a report is missing)."""
    rows = {}
    for preset, by_mode in reports.items():
        gen = by_mode.get("generate", {}).get("batches", [None])[0]
        ppl = by_mode.get("ppl", {}).get("batches", [None])[0]
        tasks = by_mode.get("tasks")
        steps = gen.get("decode_step_seconds") if gen else None
        rows[preset] = {
            "decode_tokens_per_s": gen and gen["decode_tokens_per_s"],
            "ms_per_token_median": 1e3 * statistics.median(steps) if steps else None,
            "kv_bytes": gen and gen["kv_bytes"],
            "bytes_per_token": gen and bytes_per_token(gen),
            "compression_ratio": gen and gen["compression_ratio"],
            "bits_per_element": gen and gen["bits_per_element"],
            "perplexity": ppl and ppl["perplexity"],
            "ppl_bytes_per_token": ppl and bytes_per_token(ppl),
            "step_seconds": steps,
            "kv_bytes_per_step": gen.get("kv_bytes_per_step") if gen else None,
            "task_scores": tasks and {t: tasks["batches"][0][f"tasks_type_{t}"] for t in TASK_TYPES
                                      if f"tasks_type_{t}" in tasks["batches"][0]},
            "task_samples": tasks and tasks.get("samples"),  # every sample's score and depth: the needle picture
            "task_depths": tasks and tasks["config"]["tasks"]["depths"],
            "device": next(iter(by_mode.values()))["device"],
        }
    return rows


def draw(rows: dict[str, dict], folder: Path) -> list[Path]:
    """The four pictures of the module docstring (quality only with ppl reports); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(folder / name)

    timed = {p: r for p, r in rows.items() if r["step_seconds"]}
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4))
        for preset, r in timed.items():  # token 1 comes from prefill: the decode steps make tokens 2 .. N
            ax.plot(range(2, len(r["step_seconds"]) + 2), [1e3 * s for s in r["step_seconds"]], label=preset)
        ax.set(xlabel="generated token", ylabel="decode step (ms)", title="Time per generated token")
        ax.legend()
        save(fig, "step_time.png")
        fig, ax = plt.subplots(figsize=(7, 4))
        for preset, r in timed.items():  # after prefill (token 1), then after each decode step
            ax.plot(range(1, len(r["kv_bytes_per_step"]) + 1), [b / 1024 for b in r["kv_bytes_per_step"]],
                    label=preset)
        ax.set(xlabel="generated token", ylabel="KV cache (KiB)", title="KV bytes over the generation")
        ax.legend()
        save(fig, "kv_bytes.png")
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(list(timed), [r["decode_tokens_per_s"] or 0 for r in timed.values()])
        ax.set(ylabel="decode tokens/s", title="Decode speed")
        save(fig, "decode_speed.png")
    scored = {p: r for p, r in rows.items() if r["perplexity"] is not None}
    if scored:
        fig, ax = plt.subplots(figsize=(7, 4))
        for preset, r in scored.items():
            ax.scatter(r["ppl_bytes_per_token"], r["perplexity"])
            ax.annotate(preset, (r["ppl_bytes_per_token"], r["perplexity"]), textcoords="offset points",
                        xytext=(4, 4))
        ax.set(xlabel="KV bytes per token", ylabel="perplexity (held-out text)", title="Quality against memory")
        save(fig, "quality_vs_bytes.png")
    tasked = {p: r for p, r in rows.items() if r["task_samples"]}
    if tasked:
        depths = sorted({d for r in tasked.values() for d in r["task_depths"]})
        path = plot_needles({p: r["task_samples"] for p, r in tasked.items()}, folder / "needles.png", depths)
        written += [path] if path else []
    return written


def table(rows: dict[str, dict], folder: Path) -> str:
    """The markdown table of compare.md."""
    def show(value, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    lines = ["| preset | decode tok/s | ms/token (median) | KV bytes at the end | KV bytes/token | vs fp16 | "
             "bits/element | perplexity |", "|---|---|---|---|---|---|---|---|"]
    for preset, r in rows.items():
        lines.append(f"| {preset} | {show(r['decode_tokens_per_s'], '{:,.1f}')} | "
                     f"{show(r['ms_per_token_median'], '{:.3f}')} | {show(r['kv_bytes'], '{:,}')} | "
                     f"{show(r['bytes_per_token'], '{:,.0f}')} | {show(r['compression_ratio'], '{:.2f}x')} | "
                     f"{show(r['bits_per_element'], '{:.2f}')} | {show(r['perplexity'], '{:.3f}')} |")
    scored = {p: r["task_scores"] for p, r in rows.items() if r["task_scores"]}
    if scored:
        types = [t for t in TASK_TYPES if any(t in s for s in scored.values())]
        lines += ["", "Task scores (`mode=tasks`: mean per task type; `language` is a log-likelihood):", "",
                  "| preset | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        lines += [f"| {p} | " + " | ".join(show(s.get(t), "{:.3f}") for t in types) + " |" for p, s in scored.items()]
    devices = sorted({r["device"] for r in rows.values()})
    return (f"# Presets compared ({folder})\n\nMeasured on {', '.join(devices)} by `python infer.py --multirun`; "
            f"drawn by `python -m bench.compare`. Bytes as cache.figures() counts them.\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sweep's folder: runs/compare/<timestamp>")
    args = parser.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"error: {args.folder} is not a folder; pass the one python infer.py --multirun wrote "
                         f"(runs/compare/<timestamp>)")
    try:
        rows = summarize(read_reports(args.folder))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    text = table(rows, args.folder)
    (args.folder / "compare.md").write_text(text)
    print(text)
    for path in draw(rows, args.folder):
        print(f"wrote {path}")
    if all(r["perplexity"] is None for r in rows.values()):
        print("no ppl reports, so no quality picture: add mode=generate,ppl to the --multirun command")
    write_json(args.folder / "compare.json", {p: {k: v for k, v in r.items() if k != "task_samples"}
                                              for p, r in rows.items()})


if __name__ == "__main__":
    main()
