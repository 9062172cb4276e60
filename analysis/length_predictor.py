"""`python analyze.py analysis=length_predictor`: predict how long an answer will be, per setting, from its prompt
alone (the MLSys 2025 study's tool: a LongFormer regressor, 88.8-92.8% accurate in its Table 10).

Features: our own model's final hidden states over the prompt (after the last norm, before the lm_head), the mean
over its tokens and its last token's, and the prompt's length in tokens: 2 x d_model + 1 numbers a prompt. Target:
the answer's length in tokens in one setting of analysis=length (its report, made first if there is none), as
log(length). Regressors (scikit-learn, features standardized): ridge regression at several strengths and gradient-
boosted trees, one fit per setting; the prompts are split once, disjointly, into train (60%), validation (20%:
choose the regressor) and test (20%: scored once, after the choice).

Accuracy = (1 - |L_hat - L| / L) x 100 per sample, averaged (lengths are counted on the answer alone: the study's
evaluation measured prompt length after padding, an error not copied here), next to two baselines that ignore the
prompt: the training answers' mean length and their median.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysis.length import RESEEDED
from toymodel.ranges import check_ranges


@dataclass
class LengthPredictorConfig:
    validation: float = field(default=0.2, metadata={"range": "(0, 0.5)"})  # share of prompts to choose with
    test: float = field(default=0.2, metadata={"range": "(0, 0.5)"})  # share scored once, at the end
    seed: int = 0  # the split

    def __post_init__(self) -> None:
        check_ranges(self, "length_predictor")


CANDIDATES = {f"ridge, alpha={a:g}": lambda a=a: make_pipeline(StandardScaler(), Ridge(alpha=a))
              for a in (1.0, 10.0, 100.0, 1000.0)}
CANDIDATES["gradient-boosted trees"] = lambda: make_pipeline(StandardScaler(), GradientBoostingRegressor(
    n_estimators=100, max_depth=2, learning_rate=0.05, random_state=0))


def accuracy(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean over samples of (1 - |L_hat - L| / L) x 100 (negative where a guess is off by more than L)."""
    return float(np.mean(1 - np.abs(predicted - actual) / actual) * 100)


def split(n: int, validation: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Disjoint indices of n prompts: train, validation and test, shuffled by `seed`."""
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = max(1, round(n * validation)), max(1, round(n * test))
    if n - n_val - n_test < 2:
        raise ValueError(f"{n} prompts leave fewer than 2 to train on; serve more (length.prompts)")
    return {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


@torch.inference_mode()
def features(model: torch.nn.Module, prompts: list[list[int]]) -> np.ndarray:
    """(n, 2 x d_model + 1): each prompt's mean and last final hidden state, and its length."""
    captured = []
    hook = model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    device = next(model.parameters()).device
    rows = []
    try:
        for ids in prompts:
            captured.clear()
            model(torch.tensor([ids], device=device))
            h = captured[0][0].float()  # (T, d_model)
            rows.append(torch.cat([h.mean(dim=0), h[-1], torch.tensor([float(len(ids))], device=device)]).cpu())
    finally:
        hook.remove()
    return torch.stack(rows).numpy()


def fit_setting(X: np.ndarray, lengths: np.ndarray, parts: dict[str, np.ndarray]) -> dict:
    """Choose a regressor on validation, score it and the baselines once on test."""
    train, val, test = parts["train"], parts["validation"], parts["test"]
    y = np.log(lengths)
    chosen = {name: accuracy(np.exp(make().fit(X[train], y[train]).predict(X[val])), lengths[val])
              for name, make in CANDIDATES.items()}
    best = max(chosen, key=chosen.get)
    guess = np.exp(CANDIDATES[best]().fit(X[train], y[train]).predict(X[test]))
    return {"regressor": best, "validation_accuracy": chosen, "accuracy": accuracy(guess, lengths[test]),
            "mean_baseline": accuracy(np.full(len(test), lengths[train].mean()), lengths[test]),
            "median_baseline": accuracy(np.full(len(test), np.median(lengths[train])), lengths[test]),
            "test_mean_length": float(lengths[test].mean())}


def run(model: torch.nn.Module, cfg: LengthPredictorConfig, length_report: dict) -> dict:
    """One row per setting of the length report: the chosen regressor's test accuracy next to the baselines."""
    prompts = length_report["prompts"]
    X = features(model, prompts)
    parts = split(len(prompts), cfg.validation, cfg.test, cfg.seed)
    rows = [{"setting": name, **fit_setting(X, np.array(s["lengths"], dtype=float), parts)}
            for name, s in length_report["settings"].items()]
    settings = length_report["settings"]
    rho = float(stats.spearmanr(settings["full"]["lengths"], settings[RESEEDED]["lengths"]).statistic)
    return {"split": {k: v.tolist() for k, v in parts.items()}, "rows": rows,
            "resampled_rho": None if np.isnan(rho) else rho}  # None: a constant list of lengths has no rank order


def beating(rows: list[dict]) -> list[dict]:
    """The settings where the predictor beats both baselines on the test prompts."""
    return [r for r in rows if r["accuracy"] > max(r["mean_baseline"], r["median_baseline"])]


def finding(report: dict) -> str:
    """The study's tool, what ours scores against the baselines, and whether it beats them."""
    rows = report["rows"]
    beats = beating(rows)
    best_base = [max(r["mean_baseline"], r["median_baseline"]) for r in rows]
    lines = ["The study's tool: a regressor that predicts a response's length from its prompt, 88.8-92.8% accurate "
             "(its Table 10).",
             f"Here, on {len(report['split']['test'])} test prompts never used to fit or choose: "
             f"{min(r['accuracy'] for r in rows):.1f}-{max(r['accuracy'] for r in rows):.1f}% accurate over "
             f"{len(rows)} settings, against {min(best_base):.1f}-{max(best_base):.1f}% for the better of the mean "
             f"and median baselines;"]
    if len(beats) == len(rows):
        lines.append("it beats both baselines in every setting.")
    elif beats:
        lines.append(f"it beats both baselines in {len(beats)} of {len(rows)} settings "
                     f"({', '.join(r['setting'] for r in beats)}), not in the others.")
    else:
        lines.append("it beats neither baseline in any setting.")
    if report["resampled_rho"] is not None:
        lines.append(f"How much of a length the prompt can tell at all: the full cache's answers to the same "
                     f"prompts, sampled again with other seeds, have lengths correlated at Spearman rho = "
                     f"{report['resampled_rho']:.2f} with the first ones.")
    return " ".join(lines)


def plot(report: dict, path):
    """Test accuracy per setting: the predictor and the two baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    for i, (key, label) in enumerate((("accuracy", "predictor"), ("mean_baseline", "mean of training lengths"),
                                      ("median_baseline", "median of training lengths"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=label)
    ax.set_xticks(x, [r["setting"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="accuracy on test prompts (%)", title="answer length predicted from the prompt, per setting")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
