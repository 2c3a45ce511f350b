"""Win rates with confidence intervals, raw and length-controlled.

An outcome is the score of the model against the reference on one prompt: 1 for a win,
0.5 for a tie, 0 for a loss (`JudgeBatch.outcomes` gives these). The win rate is their mean.

Intervals:
  * "bootstrap" (default): percentile interval of the mean over `n_boot` resamples. A
    resample of n outcomes with replacement only changes how often each distinct value
    appears, so it is drawn directly as multinomial counts over the distinct values —
    exactly the ordinary bootstrap, in O(n_boot) memory whatever n is.
  * "normal": mean ± z·s/√n with the sample standard deviation s (ties lower s).
  * "wilson": Wilson's score interval for a proportion, treating the mean as one. With ties
    the true variance is below p(1-p), so this interval is conservative (a little wide).

Length-controlled win rate (after AlpacaEval-LC, simplified to one covariate): judges favour
longer answers, so part of a raw win can be length alone. Fit a logistic regression of the
outcome (ties as 0.5: a fractional-response fit) on the length difference,

    P(win_i) = σ(θ₀ + θ₁·f(d_i)),   d_i = len_model_i − len_reference_i,
    f(d) = tanh(d / s)   ("tanh", default, as AlpacaEval-LC)   or   d / s   ("linear"),

with s the standard deviation of d over the sample (fixed from the full sample, so every
bootstrap refit uses the same feature). The LC win rate is the prediction at zero length
difference, σ(θ₀): how often the model would win if its answers were as long as the
reference's. tanh keeps a few very long answers from dominating the slope. Fitted by Newton's
method (IRLS) in numpy, all bootstrap replicates at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from rlhfkit.data.errors import DataError

IntervalMethod = Literal["bootstrap", "normal", "wilson"]
LengthTransform = Literal["tanh", "linear"]


@dataclass(frozen=True)
class WinRate:
    """Mean outcome (tie = half) with a `confidence` interval from `method`.

    `wins` / `ties` / `losses` count outcomes above / equal to / below 0.5.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int
    wins: int
    ties: int
    losses: int
    confidence: float = 0.95
    method: str = "bootstrap"

    def __str__(self) -> str:
        return (f"{100 * self.mean:.1f}% [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}] "
                f"(n={self.n}: {self.wins} W / {self.ties} T / {self.losses} L)")


@dataclass(frozen=True)
class LengthControlledWinRate:
    """σ(θ₀) with a bootstrap interval, the fitted coefficients and the raw win rate.

    `length_coef` θ₁ > 0 means longer answers win more often; `length_scale` is s.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int
    intercept: float
    length_coef: float
    length_scale: float
    transform: str
    raw: WinRate
    confidence: float = 0.95

    def __str__(self) -> str:
        return (f"LC {100 * self.mean:.1f}% [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}] "
                f"(raw {100 * self.raw.mean:.1f}%, n={self.n})")


def _as_outcomes(outcomes: Sequence[float], name: str = "outcomes") -> np.ndarray:
    values = np.asarray(outcomes, dtype=np.float64)
    if values.ndim != 1:
        raise DataError(f"expected a flat sequence of numbers, got shape {values.shape}",
                        field=name)
    if values.size == 0:
        raise DataError("no outcomes: a win rate needs at least one comparison", field=name)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"outcome {values[i]!r} is not in [0, 1] (1 win, 0.5 tie, 0 loss)",
                        field=f"{name}[{i}]")
    return values


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) means of resamples of `values` (n,) with replacement, drawn as multinomial
    counts over the distinct values."""
    distinct, counts = np.unique(values, return_counts=True)
    n = values.size
    draws = rng.multinomial(n, counts / n, size=n_boot)  # (n_boot, n_distinct)
    return draws @ distinct / n


def win_rate(outcomes: Sequence[float], *, confidence: float = 0.95,
             method: IntervalMethod = "bootstrap", n_boot: int = 2000, seed: int = 0) -> WinRate:
    """Mean of `outcomes` (1 win, 0.5 tie, 0 loss) and its interval (see module docstring)."""
    values = _as_outcomes(outcomes)
    _check_confidence(confidence)
    n = values.size
    mean = float(values.mean())
    alpha = 1.0 - confidence
    if method == "bootstrap":
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        means = bootstrap_means(values, n_boot, np.random.default_rng(seed))
        low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    elif method == "normal":
        z = NormalDist().inv_cdf(1 - alpha / 2)
        sd = float(values.std(ddof=1)) if n > 1 else 0.0
        low, high = mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)
    elif method == "wilson":
        z = NormalDist().inv_cdf(1 - alpha / 2)
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
        low, high = centre - half, centre + half
    else:
        raise ValueError(f"unknown interval method {method!r}; "
                         "use 'bootstrap', 'normal' or 'wilson'")
    return WinRate(mean=mean, ci_low=float(max(0.0, low)), ci_high=float(min(1.0, high)), n=n,
                   wins=int((values > 0.5).sum()), ties=int((values == 0.5).sum()),
                   losses=int((values < 0.5).sum()), confidence=confidence, method=method)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test of paired outcomes (ties dropped): p = P(|W − n/2| ≥ |w − n/2|)
    under H0: P(win) = ½, with n = wins + losses, W ~ Binomial(n, ½):

        p = min(1, 2 · Σ_{i ≤ min(w, l)} C(n, i) / 2ⁿ)

    e.g. 9 wins, 1 loss: 2 · (1 + 10) / 1024 = 0.0215. No pair decided (n = 0): p = 1."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be ≥ 0, got {wins} and {losses}")
    n, k = wins + losses, min(wins, losses)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    # Clipped so a saturated fit (all wins) gives 1 - 2e-22, not an overflow warning.
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


def fit_logistic(feature: np.ndarray, target: np.ndarray, weights: np.ndarray, *,
                 ridge: float = 1e-6, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Weighted logistic regression `target ~ σ(θ₀ + θ₁·feature)` by Newton's method.

    feature, target: (n,); target in [0, 1] (fractional targets are fine: the log-likelihood
    Σ w·[y log p + (1−y) log(1−p)] stays concave). weights: (R, n), one row per fit (bootstrap
    resample counts, or a single row of ones). Returns θ: (R, 2).

    A tiny ridge penalty `ridge·Σw·‖θ‖²/2` keeps the Newton system solvable when the data are
    separable (e.g. every outcome a win), where θ would otherwise run off to infinity; the
    prediction then saturates near 0 or 1 as it should.
    """
    x = np.stack([np.ones_like(feature), feature], axis=1)  # (n, 2)
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(axis=1)  # (R,)
    mean_y = np.clip((w @ target) / total, 1e-6, 1 - 1e-6)
    theta = np.zeros((w.shape[0], 2))
    theta[:, 0] = np.log(mean_y / (1 - mean_y))
    penalty = ridge * total
    for _ in range(max_iter):
        p = _sigmoid(theta @ x.T)  # (R, n)
        grad = (w * (target - p)) @ x - penalty[:, None] * theta  # (R, 2)
        curv = w * p * (1 - p)  # (R, n)
        h00 = curv.sum(axis=1) + penalty
        h01 = curv @ x[:, 1]
        h11 = curv @ (x[:, 1] ** 2) + penalty
        det = h00 * h11 - h01 * h01
        step = np.stack([h11 * grad[:, 0] - h01 * grad[:, 1],
                         h00 * grad[:, 1] - h01 * grad[:, 0]], axis=1) / det[:, None]
        theta = theta + step
        if np.max(np.abs(step)) < tol:
            break
    return theta


def length_controlled_win_rate(outcomes: Sequence[float], len_model: Sequence[float],
                               len_reference: Sequence[float], *, confidence: float = 0.95,
                               transform: LengthTransform = "tanh", n_boot: int = 2000,
                               seed: int = 0) -> LengthControlledWinRate:
    """σ(θ₀) of the logistic fit described in the module docstring, with a bootstrap
    percentile interval (the fit repeated on `n_boot` resamples of the prompts).

    `len_model[i]`, `len_reference[i]`: lengths (words or tokens, the same unit for both) of
    the two responses compared in `outcomes[i]`.
    """
    y = _as_outcomes(outcomes)
    _check_confidence(confidence)
    lengths = []
    for name, seq in (("len_model", len_model), ("len_reference", len_reference)):
        arr = np.asarray(seq, dtype=np.float64)
        if arr.shape != y.shape:
            raise DataError(f"has {arr.size} lengths for {y.size} outcomes", field=name)
        bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
        if bad.size:
            raise DataError(f"length {arr[bad[0]]!r} is not a finite count >= 0",
                            field=f"{name}[{int(bad[0])}]")
        lengths.append(arr)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if transform not in ("tanh", "linear"):
        raise ValueError(f"unknown length transform {transform!r}; use 'tanh' or 'linear'")
    diff = lengths[0] - lengths[1]
    scale = float(diff.std())
    if scale == 0.0:  # no length variation: the slope is unidentifiable, feature is 0
        scale, feature = 1.0, np.zeros_like(diff)
    elif transform == "tanh":
        feature = np.tanh(diff / scale)
    else:
        feature = diff / scale

    theta = fit_logistic(feature, y, np.ones((1, y.size)))[0]
    n = y.size
    rng = np.random.default_rng(seed)
    # Resample counts per bootstrap replicate; chunked so (chunk, n) arrays stay small.
    chunk = max(1, min(n_boot, 2_000_000 // n))
    intercepts = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=rows).astype(np.float64)
        intercepts.append(fit_logistic(feature, y, counts)[:, 0])
    boot = _sigmoid(np.concatenate(intercepts))
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return LengthControlledWinRate(
        mean=float(_sigmoid(theta[0])), ci_low=float(low), ci_high=float(high),
        n=n, intercept=float(theta[0]), length_coef=float(theta[1]), length_scale=scale,
        transform=transform if np.any(feature) else "none",
        raw=win_rate(y, confidence=confidence, n_boot=n_boot, seed=seed), confidence=confidence)
