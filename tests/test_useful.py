"""analysis/useful.py: useful tokens/s on hand-made reports: the excess of longer answers, the share of broken
samples from the matching negatives setting, and the two rankings."""

import pytest

from analysis.useful import excess_share, match, run


def test_excess_counts_only_tokens_beyond_the_full_answer():
    assert excess_share([10, 10, 10], [10, 15, 5]) == pytest.approx(5 / 30)
    assert excess_share([10], [10]) == 0


def negatives_report() -> dict:
    rows = [{"sample_id": str(i), "task": "passkey", "task_type": "retrieval", "preset": p, "score": s}
            for p, scores in {"full": [1, 1, 1, 1], "quant4@0.75": [1, 1, 1, 0],
                              "kvcompress@0.875": [0, 0, 1, 1]}.items() for i, s in enumerate(scores)]
    return {"sets": {"quant4@0.75": ["quant4@0.75"], "kvcompress@0.875": ["kvcompress@0.875"]},
            "budgets": {"kvcompress@0.875": 64}, "rows": rows}


def test_engine_settings_match_negatives_settings_by_preset_and_budget():
    report = negatives_report()
    assert match(report, "quant4") == "quant4@0.75" and match(report, "kvcompress 64") == "kvcompress@0.875"
    assert match(report, "kvcompress 32") is None and match(report, "quant8") is None


def test_useful_tokens_discount_longer_answers_and_broken_samples_and_rank_again():
    timed = {"latencies": [1.0, 1.0]}  # served by the engine
    served = {"full": {"lengths": [10, 10], "output_tokens_per_s": 100.0, **timed},
              "quant4": {"lengths": [10, 10], "output_tokens_per_s": 130.0, **timed},
              "kvcompress 64": {"lengths": [10, 30], "output_tokens_per_s": 150.0, **timed},
              "sink 64": {"lengths": [10, 12], "latencies": None},  # generated alone: no speed, no row
              "full, other seeds": {"lengths": [1, 1], "output_tokens_per_s": 1.0, **timed}}  # a baseline: no row
    rows = {r["setting"]: r for r in run({"settings": served}, negatives_report())}
    assert set(rows) == {"full", "quant4", "kvcompress 64"}
    assert rows["quant4"]["useful_speedup"] == pytest.approx(1.3 * 0.75)  # one of four samples broken
    assert rows["kvcompress 64"]["useful_speedup"] == pytest.approx(1.5 * (1 - 20 / 40) * 0.5)
    assert [rows[n]["raw_rank"] for n in ("kvcompress 64", "quant4", "full")] == [1, 2, 3]
    assert [rows[n]["useful_rank"] for n in ("full", "quant4", "kvcompress 64")] == [1, 2, 3]
