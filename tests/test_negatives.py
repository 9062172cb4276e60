"""analysis/negatives.py: the negative-sample rule on hand-made score tables (the median condition, the zero guard,
the set intersection, each sample counted once per theta), a score table of one's own, and `python analyze.py
quick=true analysis=negatives` end to end."""

import json

import pytest

from analysis.negatives import NegativesConfig, analyse, by_sample, negatives, qualifying, read_scores, settings
from cli_checks import analyze_quick, assert_one_line_error, run


def table(scores: dict[str, list[float]], task: str = "t", kind: str = "retrieval") -> list[dict]:
    """Rows of a score table: preset -> its score on samples 0, 1, ..."""
    family = lambda p: "quant" if p.startswith("q") else "sparse" if p.startswith("s") else ""  # noqa: E731
    return [{"sample_id": str(i), "task": task, "task_type": kind, "preset": p, "score": s, "family": family(p)}
            for p, values in scores.items() for i, s in enumerate(values)]


def test_only_samples_at_or_above_their_tasks_median_and_above_zero_qualify():
    # full scores 0, 0.5, 0.5, 1: the median of an even count is the mean of the middle two (0.5); equal qualifies
    scores, kinds = by_sample(table({"full": [0.0, 0.5, 0.5, 1.0]}))
    assert qualifying(scores, kinds) == {("t", "1"), ("t", "2"), ("t", "3")}
    # a task whose median full score is 0: only its samples above 0 may qualify (the guard)
    scores, kinds = by_sample(table({"full": [0.0, 0.0, 0.0, 1.0]}))
    assert qualifying(scores, kinds) == {("t", "3")}


def test_a_sample_is_negative_for_a_set_only_when_every_member_breaks_it():
    rows = table({"full": [1.0, 1.0, 1.0], "q4": [0.5, 1.0, 0.89], "s64": [0.5, 0.0, 1.0]})
    scores, kinds = by_sample(rows)
    assert negatives(scores, kinds, ["q4"], 0.10) == {("t", "0"), ("t", "2")}  # 0.89 <= 0.9
    assert negatives(scores, kinds, ["s64"], 0.10) == {("t", "0"), ("t", "1")}
    assert negatives(scores, kinds, ["q4", "s64"], 0.10) == {("t", "0")}  # the intersection
    assert negatives(scores, kinds, ["q4"], 0.16) == {("t", "0")}  # 0.89 > 0.84: not at 16%


def test_the_sweep_counts_each_sample_once_and_names_task_types():
    rows = table({"full": [1.0, 1.0], "q4": [0.0, 0.0], "q8": [0.0, 1.0]}) + table(
        {"full": [2.0, 2.0], "q4": [0.0, 2.0], "q8": [0.0, 2.0]}, task="u", kind="copy")
    report = analyse(rows)
    assert report["counts"]["q4"]["0.1"] == 3 and report["counts"]["Quant (C)"]["0.1"] == 2  # never 4 or 6
    assert report["counts"]["q4"]["0.01"] == report["counts"]["q4"]["0.32"] == 3  # each theta counts once
    assert report["by_type_at_10"]["Quant (C)"] == {"retrieval": 1, "copy": 1}
    assert report["mean_scores"]["q8"] == {"retrieval": 0.5, "copy": 1.0}


def test_a_score_table_of_ones_own_reads_as_csv_or_jsonl(tmp_path):
    csv = tmp_path / "scores.csv"
    csv.write_text("sample_id,task,task_type,preset,score\n1,qa,single-doc,full,0.8\n1,qa,single-doc,snapkv,0.2\n")
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in read_scores(str(csv))))
    for path in (csv, jsonl):
        scores, kinds = by_sample(read_scores(str(path)))
        assert negatives(scores, kinds, ["snapkv"], 0.5) == {("qa", "1")}
    (tmp_path / "bad.csv").write_text("sample_id,task,task_type,preset,score\n1,qa,x,full,\n")
    with pytest.raises(ValueError, match="line 2: missing \\['score'\\]"):
        read_scores(str(tmp_path / "bad.csv"))
    (tmp_path / "nofull.csv").write_text("sample_id,task,task_type,preset,score\n1,qa,x,snapkv,1\n")
    with pytest.raises(ValueError, match="no rows of preset 'full'"):
        read_scores(str(tmp_path / "nofull.csv"))


def test_settings_follow_kvpress_ratios():
    found = settings(NegativesConfig(sparse=["snapkv"], ratios=[0.5, 0.875], length=512))
    assert list(found) == ["full", "snapkv@0.5", "quant8@0.5", "snapkv@0.875", "kivi2@0.875"]
    assert found["snapkv@0.875"][1].budget == 64 and found["snapkv@0.5"][1].budget == 256
    with pytest.raises(ValueError, match="negatives.sparse"):
        NegativesConfig(sparse=["quant4"])


def test_python_analyze_quick_negatives_writes_its_report_and_pictures(tmp_path):
    report, out, result = analyze_quick(tmp_path, "negatives")
    assert report["finding"].startswith("The study's finding (3)") and report["finding"] in result.stdout
    assert set(report["counts"]["Quant (C)"]) == {"0.01", "0.02", "0.04", "0.08", "0.1", "0.16", "0.24", "0.32"}
    for name in ("negatives", "by_task_type"):
        assert (out / f"{name}.png").stat().st_size > 5_000


def test_bring_your_own_scores_from_the_command_line(tmp_path):
    (tmp_path / "s.csv").write_text("sample_id,task,task_type,preset,score\n1,qa,doc,full,1\n1,qa,doc,snapkv,0\n"
                                    "2,qa,doc,full,1\n2,qa,doc,snapkv,1\n")
    result = run("analyze.py", ["analysis=negatives", f"negatives.scores={tmp_path / 's.csv'}", "logger=none"],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "snapkv 1 negative (doc 1)" in result.stdout
    assert_one_line_error(run("analyze.py", ["analysis=negatives", "negatives.scores=nope.csv", "logger=none"],
                              cwd=tmp_path), "negatives.scores=nope.csv does not exist")


def test_a_score_table_without_a_reference_per_sample_or_anything_to_compare_is_refused(tmp_path):
    header = "sample_id,task,task_type,preset,score\n"
    (tmp_path / "orphan.csv").write_text(header + "1,qa,x,full,1\n2,qa,x,snapkv,0\n")
    with pytest.raises(ValueError, match="1 samples have no 'full' score, e.g. task 'qa' sample '2'"):
        read_scores(str(tmp_path / "orphan.csv"))
    (tmp_path / "alone.csv").write_text(header + "1,qa,x,full,1\n")
    with pytest.raises(ValueError, match="holds only preset 'full'"):
        read_scores(str(tmp_path / "alone.csv"))
