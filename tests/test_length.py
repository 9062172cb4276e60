"""analysis/length.py: D and its outlier rule on hand-made lengths, the table's tails and tests, prompts that end at
a speaker's name in the held-out plays, and `python analyze.py quick=true analysis=length` end to end."""

import json

import numpy as np
import pytest

from analysis import length, length_predictor
from analysis.length import OUTLIER, RESEEDED, LengthConfig, settings, shift, shifts, table
from cache.presets import PRESETS, at_budget
from cli_checks import analyze_quick, assert_one_line_error, run
from corpus.splits import validation_tokens
from corpus.tokenizer import get_tokenizer
from serving.serve import SPEAKER, play_prompts
from toymodel.checkpoint import PRETRAINED, read_meta


def test_d_is_the_share_the_answer_got_shorter_and_outliers_are_dropped_and_counted():
    assert shift(10, 5) == 50 and shift(10, 20) == -100 and shift(8, 8) == 0
    assert shift(2, 9) == -350 < -OUTLIER
    kept, dropped = shifts([10, 10, 2, 4], [5, 20, 9, 4])
    assert kept == [50, -100, 0] and dropped == 1


def served(lengths: dict[str, list[int]]) -> dict[str, dict]:
    return {name: {"lengths": ls, "latencies": [1.0] * len(ls), "tokens_per_s_per_request": 10.0,
                   "output_tokens_per_s": 100.0}
            for name, ls in lengths.items()}


def test_the_table_counts_tails_and_tests_against_sampling_again():
    full = [20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20]
    rows = {r["setting"]: r for r in table(served({
        "full": full, RESEEDED: [19, 21, 20, 22, 18, 20, 21, 19, 20, 20, 22, 18],
        "longer": [40, 45, 50, 29, 42, 44, 38, 41, 39, 43, 47, 36]}))}  # 29: 45% longer
    assert set(rows) == {RESEEDED, "longer"}
    longer = rows["longer"]
    assert longer["longer_by_half"] == pytest.approx(100 * 11 / 12) and longer["shorter_by_half"] == 0
    assert longer["mean_D"] < -50 and longer["wilcoxon_p"] < 0.01 and longer["more_than_resampling_p"] < 0.01
    assert rows[RESEEDED]["more_than_resampling_p"] is None and rows[RESEEDED]["longer_by_half"] == 0


def test_settings_hold_two_compression_levels_per_method_and_three_baselines():
    names = list(settings(LengthConfig()))
    assert names == ["full", "quant8", "quant4", "kvcompress 64", "kvcompress 32", "full, temp 0.9", "full, temp 1.1",
                     RESEEDED, "sink 64", "sink 32", "h2o 64", "h2o 32", "snapkv 64", "snapkv 32", "kivi4", "kivi2"]
    assert settings(LengthConfig())["h2o 32"][0] == at_budget(PRESETS["h2o"], 32)  # served in its engine cohort
    with pytest.raises(ValueError, match="length.quantized"):
        LengthConfig(quantized=["kivi2"])


def test_prompts_end_at_a_speakers_name_in_the_held_out_plays():
    enc = get_tokenizer()
    held_out = enc.decode(validation_tokens(read_meta(PRETRAINED)["run"]["data"]).tolist())
    prompts = play_prompts(held_out, 20, 96, 0, enc.encode_ordinary)
    for ids in prompts:
        text = enc.decode(ids)
        assert len(ids) <= 96 and text in held_out
        speakers = list(SPEAKER.finditer(text))
        assert speakers and speakers[-1].end() == len(text)  # the text ends with "**NAME**  \n"


def test_python_analyze_quick_length_writes_its_report_and_pictures(tmp_path):
    report, out, result = analyze_quick(tmp_path, "length")
    assert report["finding"].startswith("The study's finding (2)") and report["finding"] in result.stdout
    assert len(report["prompt_lengths"]) == 20
    assert set(report["settings"]) == set(settings(LengthConfig(**length.QUICK)))
    assert "sink 32" in report["settings"] and report["settings"]["sink 32"]["latencies"]  # served by the engine
    assert all(len(s["lengths"]) == 20 for s in report["settings"].values())
    for name in ("shift", "latency_cdf"):
        assert (out / f"{name}.png").stat().st_size > 10_000


def test_a_bad_length_knob_fails_in_one_line(tmp_path):
    assert_one_line_error(run("analyze.py", ["analysis=length", "length.quantized=[kivi2]", "logger=none"],
                              cwd=tmp_path), "length.quantized")


def test_length_accuracy_is_one_minus_the_relative_error():
    assert length_predictor.accuracy(np.array([12.0, 5.0]), np.array([10.0, 10.0])) == pytest.approx(65)
    assert length_predictor.accuracy(np.array([30.0]), np.array([10.0])) == pytest.approx(-100)  # off by 2 L


def test_the_split_is_disjoint_and_covers_every_prompt():
    parts = length_predictor.split(50, 0.2, 0.2, seed=3)
    together = np.concatenate(list(parts.values()))
    assert sorted(together.tolist()) == list(range(50)) and [len(parts[k]) for k in ("train", "validation",
                                                                                      "test")] == [30, 10, 10]
    with pytest.raises(ValueError, match="fewer than 2 to train on"):
        length_predictor.split(3, 0.4, 0.4, seed=0)


def test_the_predictor_fits_on_train_chooses_on_validation_and_never_sees_test(monkeypatch):
    seen = {"fit": [], "predict": []}

    class Recording:
        def fit(self, X, y):
            seen["fit"].append(set(X[:, 0].tolist()))
            self.mean = y.mean()
            return self

        def predict(self, X):
            seen["predict"].append(set(X[:, 0].tolist()))
            return np.full(len(X), self.mean)

    monkeypatch.setattr(length_predictor, "CANDIDATES", {"a": Recording, "b": Recording})
    X = np.arange(40, dtype=float).reshape(-1, 1)  # row i's feature is i: the rows a call sees name themselves
    parts = length_predictor.split(40, 0.25, 0.25, seed=0)
    row = length_predictor.fit_setting(X, np.arange(1, 41, dtype=float), parts)
    train, val, test = (set(parts[k].tolist()) for k in ("train", "validation", "test"))
    assert all(rows == train for rows in seen["fit"])  # every fit on the training prompts alone
    assert seen["predict"][:2] == [val, val] and seen["predict"][2:] == [test]  # chosen, then scored once
    assert set(row) >= {"regressor", "accuracy", "mean_baseline", "median_baseline"}


def test_python_analyze_quick_length_predictor_serves_first_then_predicts(tmp_path):
    result = run("analyze.py", ["quick=true", "analysis=length_predictor", "logger=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "runs" / "tiny-mha-pretrained" / "analysis"
    assert (root / "length" / "length.json").is_file()  # made first: there was none
    report = json.loads((root / "length_predictor" / "length_predictor.json").read_text())
    assert report["finding"].startswith("The study's tool")
    assert len(report["rows"]) == len(settings(LengthConfig(**length.QUICK)))  # one per setting
    assert (root / "length_predictor" / "accuracy.png").stat().st_size > 10_000
