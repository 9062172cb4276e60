"""`<run>/analysis/findings.md`: one row per finding and tool of the MLSys 2025 study (and Vidur's predictor) — the
claim, what we measured, whether it holds here — generated from the reports the analyses wrote, never typed in.
analyze.py rewrites it after every run from every report in the folder, so a row appears once its analysis ran."""

import json
from pathlib import Path

from analysis.length import BASELINES, shifted
from analysis.length_predictor import beating
from analysis.negatives import hidden
from analysis.predictor import TARGET
from analysis.sweeps import FAMILIES, verdict


def sweeps_row(report: dict) -> tuple[str, str, str]:
    rows = report["rows"]
    load = lambda r: r["batch"] * r["length"]  # noqa: E731
    light, heavy = min(map(load, rows)), max(map(load, rows))
    measured, verdicts = [], []
    for name in FAMILIES:
        mine = [r for r in rows if r["family"] == name]
        if not mine:
            continue
        at = lambda n: [r["decode_speedup"] for r in mine if load(r) == n]  # noqa: E731
        measured.append(f"{name}: {min(at(light)):.2f}-{max(at(light)):.2f}x at {light:,} cached tokens, "
                        f"{min(at(heavy)):.2f}-{max(at(heavy)):.2f}x at {heavy:,}")
        verdicts.append(f"{name}: {verdict(at(light), at(heavy), [r['decode_speedup'] for r in mine])}")
    return ("(1) compressed caches can lose throughput, gaining only at heavy KV load",
            "decode speed against full: " + "; ".join(measured), "; ".join(verdicts))


def predictor_row(report: dict) -> tuple[str, str, str]:
    acc = report["accuracy"]
    met = acc["prefill_context"] >= TARGET and acc["decode_context"] >= TARGET
    return ("Vidur: throughput predicted from operator profiles within 9%",
            f"{acc['prefill_context']:.1f}% (prefill) and {acc['decode_context']:.1f}% (decode) accurate at "
            f"{len(report['tests'])} (preset, batch, length) points never profiled; from operators timed alone "
            f"{acc['decode_alone']:.1f}% (decode)",
            "holds, with attention profiled inside the step" if met else f"does not reach {TARGET}% here")


def length_row(report: dict) -> tuple[str, str, str]:
    rows = [r for r in report["rows"] if r["setting"] not in BASELINES]
    beyond, longer = shifted(rows)
    return ("(2) compression changes response length, often making it longer",
            "answers as long as full's: " + ", ".join(f"{r['setting']} {r['same_length']:.0f}%" for r in rows)
            + f"; Wilcoxon p {min(r['wilcoxon_p'] for r in rows):.2g}-{max(r['wilcoxon_p'] for r in rows):.2g}",
            f"holds for {', '.join(longer)}" if longer else
            f"partly: {', '.join(beyond)} change lengths, not longer" if beyond else
            "does not hold: no setting changes lengths more than sampling again")


def length_predictor_row(report: dict) -> tuple[str, str, str]:
    rows = report["rows"]
    return ("(2, tool) a regressor predicts response length from the prompt, 88.8-92.8%",
            f"{min(r['accuracy'] for r in rows):.1f}-{max(r['accuracy'] for r in rows):.1f}% accurate; the better "
            f"baseline {min(max(r['mean_baseline'], r['median_baseline']) for r in rows):.1f}-"
            f"{max(max(r['mean_baseline'], r['median_baseline']) for r in rows):.1f}%"
            + ("" if report["resampled_rho"] is None else
               f"; resampled lengths correlate at rho {report['resampled_rho']:.2f}"),
            f"beats both baselines in {len(beating(rows))} of {len(rows)} settings")


def negatives_row(report: dict) -> tuple[str, str, str]:
    counts = {name: c["0.1"] for name, c in report["counts"].items()}
    worst = max(counts, key=counts.get)
    quiet = hidden(report)
    return ("(3) a small average loss hides negative samples, concentrated in task types",
            f"{report['qualifying']} of {report['samples']} samples qualify; at theta 10% {worst} breaks the most "
            f"({counts[worst]}); by task type: " + ", ".join(sorted({k for t in report["by_type_at_10"].values()
                                                                     for k in t}) or ["none"]),
            f"holds: {', '.join(quiet)} break samples within 5% of full's mean score" if quiet else
            "partly: samples break, the average shows it" if any(counts.values()) else
            "does not hold: nothing breaks at 10%")


def useful_row(report: dict) -> tuple[str, str, str]:
    rows = report["rows"]
    moved = [r["setting"] for r in rows if r["raw_rank"] != r["useful_rank"]]
    return ("(beyond the study) raw speed against useful tokens/s",
            "; ".join(f"{r['setting']} {r['raw_speedup']:.2f}x raw, {r['useful_speedup']:.2f}x useful" for r in rows),
            f"the rankings disagree: {', '.join(moved)} move" if moved else "the rankings agree")


ROWS = {"sweeps": sweeps_row, "predictor": predictor_row, "length": length_row,
        "length_predictor": length_predictor_row, "negatives": negatives_row, "useful": useful_row}


def write(folder: Path) -> Path | None:
    """findings.md in `folder` (<run>/analysis) from every report there; None when there is none yet."""
    lines = ["| analysis | the paper's finding or tool | what we measured | here |", "|---|---|---|---|"]
    for name, row in ROWS.items():
        path = folder / name / f"{name}.json"
        if path.is_file():
            cells = row(json.loads(path.read_text()))
            lines.append(f"| `{name}` | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if len(lines) == 2:
        return None
    out = folder / "findings.md"
    out.write_text("# Findings\n\nGenerated by `python analyze.py` from the reports beside this file.\n\n"
                   + "\n".join(lines) + "\n")
    return out
