"""analyze.py and analysis/: the throughput definitions on hand-made timings, what the sweep measures, the finding
it writes from its numbers, and `python analyze.py quick=true analysis=sweeps` end to end as a user runs it."""

from pathlib import Path

import pytest

from analysis.config import ANALYSES
from analysis.sweeps import QUICK, SweepsConfig, finding, points, settings
from analysis.throughput import decode_throughput, prefill_throughput
from cli_checks import analyze_quick, assert_one_line_error, run


def test_throughput_as_the_study_defines_it():
    assert prefill_throughput(batch=2, prompt_tokens=100, seconds=0.5) == 400
    assert decode_throughput(4, [0.3, 0.1, 1.0, 0.2]) == pytest.approx(4 / 0.25)  # 0.1 and 1.0 dropped
    assert decode_throughput(1, [0.2, 0.2, 0.2]) == pytest.approx(5)
    with pytest.raises(ValueError, match="at least 3 steps"):
        decode_throughput(1, [0.1, 0.2])


def test_the_settings_are_the_studys_budgets_and_both_kernel_paths():
    found = settings(SweepsConfig(presets=["full", "sink", "h2o", "quant4"], naive=["quant4"], budget=512,
                                  scaled_budget=128))
    assert list(found) == ["full", "sink@512", "sink@128", "h2o@512", "h2o@128", "quant4", "quant4 naive"]
    assert (found["sink@512"].budget, found["sink@512"].sink) == (512, 64)  # 64 sinks of 512
    assert (found["h2o@512"].budget, found["h2o@512"].window) == (512, 448)  # 64 heavy hitters, 448 recent
    assert found["quant4 naive"].attend == "naive" and found["quant4"].attend == "fused"


def test_points_cover_both_sweeps_and_the_grid_once_each():
    cfg = SweepsConfig(batch=8, lengths=[256, 1024], length=1024, batches=[1, 8], grid_batches=[1, 4],
                       grid_lengths=[256, 1024])
    assert points(cfg) == [(1, 256), (1, 1024), (4, 256), (8, 256), (4, 1024), (8, 1024)]


def rows(speedups: dict[tuple[str, int], float]) -> list[dict]:
    """Hand-made sweep rows: full at 100 tokens/s, each setting at its speedup, at loads 1x64 and 16x4096."""
    family = {"full": None, "quant4": "quantized, fused", "quant4 naive": "quantized, naive", "sink@32": "sparse"}
    out = []
    for (name, batch), speedup in [(("full", 1), 1.0), (("full", 16), 1.0), *speedups.items()]:
        out.append({"setting": name, "family": family[name], "batch": batch, "length": 64 if batch == 1 else 4096,
                    "decode_tokens_per_s": 100 * speedup, "decode_speedup": speedup})
    return out


def test_the_finding_judges_each_family_by_its_own_numbers():
    text = finding(rows({("quant4", 1): 0.8, ("quant4", 16): 0.9, ("quant4 naive", 1): 0.4,
                         ("quant4 naive", 16): 0.3, ("sink@32", 1): 0.9, ("sink@32", 16): 1.6}), "test CPU")
    assert "sparse (1 setting): 0.90-0.90x light, 1.60-1.60x heavy (best sink@32); holds" in text
    assert "quantized, naive (1 setting): 0.40-0.40x light, 0.30-0.30x heavy" in text
    assert "never faster than full here" in text
    assert "at 0.33-0.50x the speed of the fused kernels" in text  # naive / fused at each point: 0.3/0.9, 0.4/0.8
    assert "falls from 100 to 100 tokens/s" not in text  # full's batch-1 line needs two lengths at that batch
    faster = finding(rows({("sink@32", 1): 1.2, ("sink@32", 16): 1.6}), "test CPU")
    assert "does not hold: not slower than full even at the lightest load" in faster


def test_python_analyze_quick_sweeps_writes_its_report_and_pictures(tmp_path):
    report, out, result = analyze_quick(tmp_path, "sweeps")
    assert report["finding"].startswith("The study's finding (1)") and report["finding"] in result.stdout
    expected = len(settings(SweepsConfig(**QUICK))) * len(points(SweepsConfig(**QUICK)))
    assert len(report["rows"]) == expected and all(r["decode_tokens_per_s"] > 0 for r in report["rows"])
    assert [r["setting"] for r in report["serving"]] == ["full", "quant8", "quant4", "kvcompress 4x",
                                                         "kvcompress 4x, decoding"]
    assert "In the serving engine" in report["finding"]
    for name in ("length", "batch", "heatmap", "serving"):
        assert (out / f"{name}.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, needle", [
    (["analysis=nope"], "analysis='nope'"),
    (["sweeps.presets=[full,fulll]"], "unknown presets ['fulll']"),
    (["sweeps.steps=2"], "sweeps.steps=2"),
])
def test_bad_settings_fail_in_one_line(tmp_path: Path, args, needle):
    assert_one_line_error(run("analyze.py", [*args, "logger=none"], cwd=tmp_path), needle)


def test_python_analyze_quick_runs_every_analysis_and_writes_the_findings_table(tmp_path):
    result = run("analyze.py", ["quick=true", "logger=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "runs" / "tiny-mha-pretrained" / "analysis"
    assert all((folder / name / f"{name}.json").is_file() for name in ANALYSES)
    table = (folder / "findings.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(ANALYSES)  # one row per analysis, in order
    assert all(row.count(" | ") == 3 and "nan" not in row for row in rows)
