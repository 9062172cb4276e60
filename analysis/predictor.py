"""`python analyze.py analysis=predictor`: a Vidur-style throughput predictor. Operators are profiled on this device
(analysis/profile.py), a regressor per operator learns their cost from their sizes, and prefill and decode
throughput of configurations never measured are predicted from the operators alone, then checked against
measurements at those configurations (analysis/throughput.py's definitions):

    prefill seconds (B, T)  = dense prefill (B x T tokens) + attention prefill (B, T)
    decode step (B, T)      = dense decode (B tokens) + attention decode (B, T)

The dense operators are timed alone, by token count, as Vidur times its linear operators. Attention is profiled two
ways at every (batch, length) of a grid: alone (Vidur's way: the layer caches on random queries, keys and values),
and in context (a whole step of the model through the preset's cache, minus the dense operator timed alone). On
the development CPU a whole step takes longer than its operators alone add up to, even where weights and cache
fit in its caches together; the predictions use the attention profiled in context, which carries that cost, and
the ones from the operators alone are reported beside them.

Test configurations (`test_batches` x `test_lengths`) lie inside the grid and never on it: the predictor never
sees them until it is scored, once. Accuracy = (1 - mean |predicted - measured| / measured) x 100 (Vidur reports
under 9% error, i.e. above 91%).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.interpolate import LinearNDInterpolator
from sklearn.ensemble import RandomForestRegressor

from analysis import profile
from analysis.throughput import measure
from cache.presets import PRESETS
from toymodel.ranges import POSITIVE, check_ranges

PHASES = ("prefill", "decode")
TARGET = 90  # accuracy (%) the predictor aims at: Vidur reports under 9% error


@dataclass
class PredictorConfig:
    presets: list[str] = field(default_factory=lambda: ["full", "quant8", "quant4", "kivi4", "kivi2", "gear4",
                                                        "sink", "h2o", "snapkv", "kvcompress", "minicache"])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # the profile's grid
    lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    test_batches: list[int] = field(default_factory=lambda: [3, 6])  # measured only to score the predictions
    test_lengths: list[int] = field(default_factory=lambda: [192, 384, 768])
    steps: int = field(default=8, metadata={"range": "[3, inf)"})  # decode steps per point (fastest, slowest dropped)
    repeats: int = field(default=2, metadata=POSITIVE)  # runs per profile and test point: the fastest counts

    def __post_init__(self) -> None:
        check_ranges(self, "predictor")
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"predictor: unknown presets {unknown}; choose among {', '.join(PRESETS)}")
        for name in ("batches", "lengths"):
            grid, test = getattr(self, name), getattr(self, f"test_{name}")
            if len(grid) < 2 or min(grid) < 1:
                raise ValueError(f"predictor.{name}={grid}: give at least two positive sizes to interpolate between")
            inside = [t for t in test if min(grid) < t < max(grid) and t not in grid]
            if inside != test or not test:
                raise ValueError(f"predictor.test_{name}={test} must be non-empty and lie strictly between the "
                                 f"profiled {name} {sorted(grid)}, none of them profiled: the predictor interpolates "
                                 f"and never sees its test points")


LARGE = dict(batches=[1, 2, 4, 8, 16, 32, 64], lengths=[256, 512, 1024, 2048, 4096], test_batches=[3, 12, 48],
             test_lengths=[384, 1536, 3072])  # a GPU's scale
QUICK = dict(presets=["full", "quant4", "sink"], batches=[1, 4], lengths=[32, 128], test_batches=[2],
             test_lengths=[64], steps=3, repeats=1)


def powers_of_two(low: int, high: int) -> list[int]:
    """Powers of two covering [low, high]: the sizes the dense operators are timed at."""
    return [2 ** e for e in range(int(math.floor(math.log2(low))), int(math.ceil(math.log2(high))) + 1)]


def accuracy(predicted: list[float], measured: list[float]) -> float:
    """(1 - mean |predicted - measured| / measured) x 100."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    return (1 - sum(errors) / len(errors)) * 100


class Interpolation:
    """Piecewise-linear interpolation of log seconds over log sizes (1 size: np.interp; more: a Delaunay mesh)."""

    name = "interpolation"

    def fit(self, X: np.ndarray, y: np.ndarray) -> "Interpolation":
        self.X, self.y = np.log2(X), np.log(y)
        self.mesh = LinearNDInterpolator(self.X, self.y) if X.shape[1] > 1 else None
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.mesh is None:
            order = np.argsort(self.X[:, 0])
            return np.exp(np.interp(np.log2(X[:, 0]), self.X[order, 0], self.y[order]))
        return np.exp(self.mesh(np.log2(X)))  # NaN outside the profiled hull: never asked there (see the config)


class Forest:
    """Vidur's regressor: a random forest over log sizes, predicting log seconds."""

    name = "random forest"

    def fit(self, X: np.ndarray, y: np.ndarray) -> "Forest":
        self.model = RandomForestRegressor(n_estimators=100, random_state=0).fit(np.log2(X), np.log(y))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self.model.predict(np.log2(X)))


def interior(X: np.ndarray) -> list[int]:
    """Indices of the points strictly inside the others' range on every axis: where leaving one out still leaves
    something to interpolate from."""
    lo, hi = X.min(axis=0), X.max(axis=0)
    return [i for i, x in enumerate(X) if ((x > lo) & (x < hi)).all()]


def validation_errors(X: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """Leave-one-out relative errors of each regressor at the interior profile points (the test points play no
    part): the model selection."""
    errors: dict[str, list[float]] = {Interpolation.name: [], Forest.name: []}
    for i in interior(X):
        rest = np.arange(len(X)) != i
        for make in (Interpolation, Forest):
            guess = make().fit(X[rest], y[rest]).predict(X[i:i + 1])[0]
            errors[make.name].append(abs(guess - y[i]) / y[i])
    return errors


@dataclass
class Operator:
    """One operator's regressor, fitted to its profile (X: (n, d) sizes, y: (n,) seconds)."""

    regressor: Interpolation | Forest

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, choice: str) -> "Operator":
        return cls((Interpolation if choice == Interpolation.name else Forest)().fit(X, y))

    def __call__(self, *sizes: float) -> float:
        return float(self.regressor.predict(np.array([sizes], dtype=float))[0])


def choose(errors: list[dict[str, list[float]]]) -> tuple[str, dict[str, float]]:
    """The regressor with the lower mean leave-one-out error over every operator's interior points."""
    mean = {name: float(np.mean([e for op in errors for e in op[name]] or [math.inf]))
            for name in (Interpolation.name, Forest.name)}
    return min(mean, key=mean.get), mean


def profile_dense(model: torch.nn.Module, cfg: PredictorConfig, progress) -> list[dict]:
    """The dense operators at powers of two: a decode step of B rows, a prefill of n tokens."""
    sizes = [("decode", n) for n in powers_of_two(1, max(cfg.batches))]
    sizes += [("prefill", n) for n in powers_of_two(min(cfg.batches) * min(cfg.lengths),
                                                    max(cfg.batches) * max(cfg.lengths))]
    return [{"op": f"dense {phase}", "tokens": n,
             "seconds": profile.dense(model, n, 1, cfg.repeats) if phase == "decode"
             else profile.dense(model, 1, n, cfg.repeats)} for phase, n in progress(sizes, "dense")]


def step_seconds(model: torch.nn.Module, preset: str, batch: int, length: int, steps: int,
                 repeats: int) -> dict[str, float]:
    """Whole steps of the model through `preset`'s cache, the fastest of `repeats` measurements: prefill seconds
    and the mean decode step (as analysis/throughput.py defines it), and how far the slowest run fell behind the
    fastest (`*_spread`, a fraction: what the machine's noise alone does to one measurement)."""
    runs = [measure(model, PRESETS[preset], batch, length, steps) for _ in range(repeats)]
    out = {}
    for phase, tokens in (("prefill", batch * length), ("decode", batch)):
        speeds = [m[f"{phase}_tokens_per_s"] for m in runs]
        out[phase], out[f"{phase}_spread"] = tokens / max(speeds), 1 - min(speeds) / max(speeds)
    return out


def attention_alone(model: torch.nn.Module, preset: str, batch: int, length: int, steps: int,
                    repeats: int) -> dict[str, float]:
    """Attention alone, the fastest of `repeats` profiles: prefill seconds, and the mean decode step with the
    fastest and the slowest dropped."""
    runs = [profile.attention(model, PRESETS[preset], batch, length, steps) for _ in range(repeats)]
    return {"prefill": min(prefill for prefill, _ in runs),
            "decode": min(sum(sorted(d)[1:-1]) / (len(d) - 2) for _, d in runs)}


def profile_attention(model: torch.nn.Module, cfg: PredictorConfig, progress) -> list[dict]:
    """Attention per preset over the grid: alone, and the whole step it is part of."""
    rows = []
    points = [(p, B, T) for p in cfg.presets for B in cfg.batches for T in cfg.lengths]
    for preset in cfg.presets:  # warm-up, not recorded: kernels load, the allocator grows
        measure(model, PRESETS[preset], 1, min(cfg.lengths), 3)
    for preset, B, T in progress(points, "attention"):
        alone = attention_alone(model, preset, B, T, cfg.steps, cfg.repeats)
        step = step_seconds(model, preset, B, T, cfg.steps, cfg.repeats)
        rows.append({"preset": preset, "batch": B, "length": T, "step_prefill": step["prefill"],
                     "step_decode": step["decode"], "alone_prefill": alone["prefill"], "alone_decode": alone["decode"]})
    return rows


def in_context(rows: list[dict], dense: dict[str, Operator]) -> list[dict]:
    """The rows with attention in context: each whole step minus the dense operator at its size (at least 1 ns)."""
    return [{**r, "context_prefill": max(r["step_prefill"] - dense["prefill"](r["batch"] * r["length"]), 1e-9),
             "context_decode": max(r["step_decode"] - dense["decode"](r["batch"]), 1e-9)} for r in rows]


def dense_profile(rows: list[dict], phase: str) -> tuple[np.ndarray, np.ndarray]:
    mine = [r for r in rows if r["op"] == f"dense {phase}"]
    return np.array([[r["tokens"]] for r in mine], float), np.array([r["seconds"] for r in mine])


def attention_profile(rows: list[dict], preset: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    mine = [r for r in rows if r["preset"] == preset]
    return np.array([[r["batch"], r["length"]] for r in mine], float), np.array([r[key] for r in mine])


def fit_dense(rows: list[dict], choice: str) -> dict[str, Operator]:
    return {phase: Operator.fit(*dense_profile(rows, phase), choice) for phase in PHASES}


def predict(dense: dict[str, Operator], attention: dict[str, Operator], batch: int, length: int) -> dict[str, float]:
    """Prefill and decode throughput (tokens/s) of one configuration, from the operators."""
    prefill = dense["prefill"](batch * length) + attention["prefill"](batch, length)
    decode = dense["decode"](batch) + attention["decode"](batch, length)
    return {"prefill": batch * length / prefill, "decode": batch / decode}


def run(model: torch.nn.Module, cfg: PredictorConfig, progress) -> dict:
    """Profile, choose and fit the regressors, then measure the test configurations and score the predictions."""
    dense_rows = profile_dense(model, cfg, progress)
    attention_rows = profile_attention(model, cfg, progress)
    # Model selection on the profile alone: each regressor left out of every interior point in turn (attention in
    # context taken against the interpolated dense operators, as a first guess).
    probe = in_context(attention_rows, fit_dense(dense_rows, Interpolation.name))
    errors = [validation_errors(*dense_profile(dense_rows, phase)) for phase in PHASES]
    errors += [validation_errors(*attention_profile(probe, p, f"context_{phase}"))
               for p in cfg.presets for phase in PHASES]
    choice, validation = choose(errors)
    dense = fit_dense(dense_rows, choice)
    attention_rows = in_context(attention_rows, dense)  # against the dense operators the predictions add back
    fitted = {(p, how): {phase: Operator.fit(*attention_profile(attention_rows, p, f"{how}_{phase}"), choice)
                         for phase in PHASES} for p in cfg.presets for how in ("context", "alone")}
    tests = []
    points = [(p, B, T) for p in cfg.presets for B in cfg.test_batches for T in cfg.test_lengths]
    for preset, B, T in progress(points, "test"):
        m = step_seconds(model, preset, B, T, cfg.steps, cfg.repeats)
        row = {"preset": preset, "batch": B, "length": T, "prefill_measured": B * T / m["prefill"],
               "decode_measured": B / m["decode"], "prefill_spread": m["prefill_spread"],
               "decode_spread": m["decode_spread"]}
        for how in ("context", "alone"):
            row.update({f"{phase}_{how}": v for phase, v in predict(dense, fitted[preset, how], B, T).items()})
        tests.append(row)
    scores = {f"{phase}_{how}": accuracy([r[f"{phase}_{how}"] for r in tests], [r[f"{phase}_measured"] for r in tests])
              for phase in PHASES for how in ("context", "alone")}
    per_preset = {p: {phase: accuracy([r[f"{phase}_context"] for r in tests if r["preset"] == p],
                                      [r[f"{phase}_measured"] for r in tests if r["preset"] == p])
                      for phase in PHASES} for p in cfg.presets}
    encode = {p: profile.encode(PRESETS[p], model, max(cfg.lengths), cfg.repeats) for p in cfg.presets}
    return {"dense": dense_rows, "attention": attention_rows, "tests": tests, "regressor": choice,
            "validation_error": validation, "accuracy": scores, "accuracy_per_preset": per_preset,
            "encode_seconds_per_token": encode}


def finding(report: dict, device: str) -> str:
    """Vidur's claim, what the predictor scored here, and why the operators alone score what they do."""
    tests, acc, val = report["tests"], report["accuracy"], report["validation_error"]
    met = lambda a: "met" if a >= TARGET else "missed"  # noqa: E731
    configs = sorted({(r["batch"], r["length"]) for r in tests})
    worst = {phase: min(report["accuracy_per_preset"].items(), key=lambda kv: kv[1][phase]) for phase in PHASES}
    under = [r["decode_alone"] / r["decode_measured"] for r in tests]  # > 1: the parts alone are too fast
    ratios = sorted(r["step_decode"] / (r["step_decode"] - r["context_decode"] + r["alone_decode"])
                    for r in report["attention"])  # a whole step / the sum of its operators alone
    smallest = min(report["attention"], key=lambda r: r["batch"] * r["length"])
    at_smallest = smallest["step_decode"] / (smallest["step_decode"] - smallest["context_decode"]
                                             + smallest["alone_decode"])
    spread = lambda phase: float(np.mean([r[f"{phase}_spread"] for r in tests]))  # noqa: E731
    lines = [
        "Vidur's claim: profiling each operator alone and learning its cost predicts an LLM's throughput within 9%.",
        f"Measured here ({device}): at {len(configs)} configurations (batch, prompt length) never profiled, "
        f"{', '.join(f'({b}, {t})' for b, t in configs)}, for {len({r['preset'] for r in tests})} presets, the "
        f"predictor ({report['regressor']}: leave-one-out error at the profile's interior points "
        + ", ".join(f"{k} {v:.1%}" for k, v in val.items())
        + f") is {acc['prefill_context']:.1f}% accurate for prefill and {acc['decode_context']:.1f}% for decode "
        f"(target 90%: {met(acc['prefill_context'])} and {met(acc['decode_context'])}); its worst presets: "
        f"{worst['prefill'][0]} {worst['prefill'][1]['prefill']:.1f}% (prefill), {worst['decode'][0]} "
        f"{worst['decode'][1]['decode']:.1f}% (decode)."
        + (f" The slowest and the fastest measurement of one test configuration differ by {spread('prefill'):.1%} "
           f"(prefill) and "
           f"{spread('decode'):.1%} (decode) on average here: the floor under any prediction's error on this "
           f"machine." if spread("decode") > 0 else ""),
        f"With attention profiled alone, as Vidur does, the same predictor scores {acc['prefill_alone']:.1f}% and "
        f"{acc['decode_alone']:.1f}%, its decode throughput {min(under):.2f}-{max(under):.2f}x the measured one"
        + (f": a whole decode step takes {ratios[len(ratios) // 2]:.2f}x the time its operators timed alone add "
           f"up to (median over the profile's points; {at_smallest:.2f}x at the smallest, "
           f"{smallest['batch'] * smallest['length']:,} cached tokens), so the sum of the parts misses part of "
           f"every step; attention profiled inside the step carries it into the profile."
           if acc["decode_alone"] < acc["decode_context"] - 2 else
           ": the operators alone add up to a step here, as on the GPUs Vidur profiles."),
    ]
    encode = report["encode_seconds_per_token"]
    if len(encode) > 1:
        slow = max(encode, key=encode.get)
        lines.append(f"Encoding a token's K and V for one layer costs {encode[slow] * 1e6:.1f} us with {slow}, the "
                     f"dearest codec here" + (f" (full precision: {encode['full'] * 1e6:.2f} us)." if "full" in encode
                                              else "."))
    return " ".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Predicted against measured throughput, prefill and decode, a colour per preset: filled from attention in
    context, hollow from attention alone; the band is +-10%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    tests = report["tests"]
    presets = list(dict.fromkeys(r["preset"] for r in tests))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, phase in zip(axes, PHASES):
        measured = [r[f"{phase}_measured"] for r in tests]
        lo, hi = min(measured) / 1.5, max(measured) * 1.5
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="0.9", label="within 10%")
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        for i, preset in enumerate(presets):
            mine = [r for r in tests if r["preset"] == preset]
            color = plt.cm.tab20(i % 20)
            ax.scatter([r[f"{phase}_measured"] for r in mine], [r[f"{phase}_context"] for r in mine], color=color,
                       s=22, label=preset)
            ax.scatter([r[f"{phase}_measured"] for r in mine], [r[f"{phase}_alone"] for r in mine], s=22,
                       facecolors="none", edgecolors=color)
        ax.set(xscale="log", yscale="log", xlabel="measured tokens/s", ylabel="predicted tokens/s",
               title=f"{phase}: {report['accuracy'][f'{phase}_context']:.1f}% accurate "
                     f"(alone: {report['accuracy'][f'{phase}_alone']:.1f}%)")
    for axis in [a for ax in axes for a in (ax.xaxis, ax.yaxis)]:  # labels at 1, 2, 5 x 10^k, in plain numbers
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        axis.set_minor_formatter(NullFormatter())
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("throughput predicted from operator profiles vs measured at configurations never profiled "
                 "(filled: attention in context; hollow: alone)", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
