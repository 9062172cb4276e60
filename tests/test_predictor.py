"""analysis/predictor.py and analysis/profile.py: the accuracy formula on known values, the regressors on known
curves, a profile that never sees its test points, and `python analyze.py quick=true analysis=predictor` end to
end as a user runs it."""

import numpy as np
import pytest
import torch

from analysis import predictor, profile
from analysis.predictor import Forest, Interpolation, PredictorConfig, accuracy, powers_of_two, validation_errors
from cli_checks import analyze_quick, assert_one_line_error, run
from engine_checks import model


def test_accuracy_is_one_minus_the_mean_relative_error():
    assert accuracy([110, 90], [100, 100]) == pytest.approx(90)
    assert accuracy([50, 300], [100, 200]) == pytest.approx(50)  # errors 50% and 50%
    assert accuracy([7.0], [7.0]) == 100


def test_interpolation_recovers_a_power_law_where_a_forest_steps():
    sizes = np.array([[n] for n in powers_of_two(1, 1024)], dtype=float)
    seconds = 3e-4 * sizes[:, 0] ** 0.7  # a straight line in log-log
    unseen = np.array([[3.0], [100.0], [700.0]])
    exact = 3e-4 * unseen[:, 0] ** 0.7
    assert Interpolation().fit(sizes, seconds).predict(unseen) == pytest.approx(exact, rel=1e-9)
    assert not Forest().fit(sizes, seconds).predict(unseen) == pytest.approx(exact, rel=0.01)
    errors = validation_errors(sizes, seconds)
    assert len(errors["interpolation"]) == len(sizes) - 2  # every point but the two ends, left out in turn
    assert max(errors["interpolation"]) < 1e-9 < min(errors["random forest"])


def test_two_sizes_interpolate_over_a_grid():
    grid = np.array([[b, t] for b in (1, 4, 16) for t in (128, 512, 2048)], dtype=float)
    seconds = 1e-5 * grid[:, 0] * grid[:, 1] ** 0.5
    fit = Interpolation().fit(grid, seconds)
    assert fit.predict(np.array([[2.0, 256.0], [8.0, 1024.0]])) == pytest.approx([1e-5 * 2 * 16, 1e-5 * 8 * 32])
    assert validation_errors(grid, seconds)["interpolation"][0] < 1e-9  # (4, 512), the only interior point


@pytest.mark.parametrize("knobs, needle", [
    (dict(test_batches=[4]), "test_batches=[4]"),  # on the grid
    (dict(test_lengths=[4096]), "test_lengths=[4096]"),  # outside it: extrapolation
    (dict(test_lengths=[]), "test_lengths=[]"),
    (dict(batches=[4]), "at least two"),
    (dict(presets=["full", "nope"]), "unknown presets ['nope']"),
])
def test_bad_configs_name_the_field(knobs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        PredictorConfig(**knobs)


def test_no_attention_runs_the_models_forward_without_attending():
    m = model()
    ids = torch.randint(0, 97, (3, 5))
    with torch.inference_mode():
        out = m(ids, profile.NoAttention(m.config.n_layer, ids.device), last_only=True)
    assert out.shape == (3, 1, 97) and torch.isfinite(out).all()
    assert profile.dense(m, 2, 1, repeats=1) > 0


def test_the_predictor_never_sees_its_test_points(monkeypatch):
    """Every regressor is fitted before the first test configuration is measured, on sizes that are never a test
    configuration."""
    events = []
    fit, measure = predictor.Operator.fit.__func__, predictor.measure

    def recording_fit(cls, X, y, choice):
        events.append(("fit", [tuple(x) for x in X]))
        return fit(cls, X, y, choice)

    def recording_measure(m, spec, batch, length, steps):
        events.append(("measure", (batch, length)))
        return measure(m, spec, batch, length, steps)

    monkeypatch.setattr(predictor.Operator, "fit", classmethod(recording_fit))
    monkeypatch.setattr(predictor, "measure", recording_measure)
    cfg = PredictorConfig(**{**predictor.QUICK, "presets": ["full", "sink"]})  # int codes: head_dim 8 < G
    report = predictor.run(model(), cfg, lambda items, desc: items)
    tests = {(b, t) for b in cfg.test_batches for t in cfg.test_lengths}
    measured = [i for i, (kind, size) in enumerate(events) if kind == "measure" and size in tests]
    fits = [i for i, (kind, _) in enumerate(events) if kind == "fit"]
    assert measured and max(fits) < min(measured)
    assert not any(tuple(map(int, x)) in tests for kind, X in events if kind == "fit" for x in X)
    assert len(report["tests"]) == len(cfg.presets) * len(tests)
    assert set(report["accuracy"]) == {"prefill_context", "decode_context", "prefill_alone", "decode_alone"}


def test_python_analyze_quick_predictor_writes_its_report_and_picture(tmp_path):
    report, out, result = analyze_quick(tmp_path, "predictor")
    assert report["finding"].startswith("Vidur's claim") and report["finding"] in result.stdout
    assert report["regressor"] in ("interpolation", "random forest")
    assert all(r["prefill_measured"] > 0 and r["decode_context"] > 0 for r in report["tests"])
    assert (out / "predicted.png").stat().st_size > 10_000


def test_a_test_point_on_the_grid_fails_in_one_line(tmp_path):
    assert_one_line_error(run("analyze.py", ["analysis=predictor", "predictor.test_batches=[4]", "logger=none"],
                              cwd=tmp_path), "predictor.test_batches=[4]")
