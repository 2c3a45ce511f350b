"""Win rates: hand-checked intervals, bootstrap coverage, length control."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.eval.winrate import (
    bootstrap_means,
    fit_logistic,
    length_controlled_win_rate,
    sign_test,
    win_rate,
)


def test_counts_and_closed_form_intervals_by_hand():
    # outcomes [1, 0.5, 0, 1]: mean 2.5/4 = 0.625; 2 wins, 1 tie, 1 loss.
    outcomes = [1.0, 0.5, 0.0, 1.0]
    normal = win_rate(outcomes, method="normal")
    assert (normal.mean, normal.n, normal.wins, normal.ties, normal.losses) == (0.625, 4, 2, 1, 1)
    # Normal: deviations .375, -.125, -.625, .375 → Σd² = .6875, s² = .6875/3,
    # half-width = 1.959964·√(.6875/3)/2 = 0.469128; upper bound clipped to 1.
    assert normal.ci_low == pytest.approx(0.625 - 0.469128, abs=1e-5)
    assert normal.ci_high == 1.0
    # Wilson, z² = 3.841459: centre = (.625 + z²/8)/(1 + z²/4) = 0.563766,
    # half = z/(1 + z²/4)·√(.625·.375/4 + z²/64) = 0.344335.
    wilson = win_rate(outcomes, method="wilson")
    assert wilson.ci_low == pytest.approx(0.563766 - 0.344335, abs=1e-5)
    assert wilson.ci_high == pytest.approx(0.563766 + 0.344335, abs=1e-5)


def test_bootstrap_interval_is_seeded_and_ordered():
    outcomes = [1.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0]
    a = win_rate(outcomes, n_boot=500, seed=3)
    assert a == win_rate(outcomes, n_boot=500, seed=3)
    assert a.ci_low < a.mean < a.ci_high and a.method == "bootstrap"
    assert win_rate([1.0], n_boot=100).ci_low == 1.0  # one win: every resample is a win


def test_multinomial_bootstrap_has_the_plain_bootstrap_spread():
    # Resampling n values with replacement gives means with variance σ²/n (σ² the
    # population variance of the sample, ddof=0); the multinomial draw must match it.
    values = np.array([1.0] * 30 + [0.5] * 10 + [0.0] * 20)
    means = bootstrap_means(values, 20_000, np.random.default_rng(0))
    assert means.mean() == pytest.approx(values.mean(), abs=2e-3)
    assert means.std() == pytest.approx(values.std() / math.sqrt(values.size), rel=0.03)


@pytest.mark.parametrize("method, low, high", [
    ("bootstrap", 0.93, 0.97),
    ("normal", 0.93, 0.97),
    ("wilson", 0.95, 0.995),  # conservative with ties: the tie-free variance bound is wider
])
def test_interval_coverage_on_a_known_win_rate(method, low, high):
    # 1000 experiments of n=200 comparisons: P(win) .5, P(tie) .2, P(loss) .3 → true rate .6.
    # Coverage of a 95% interval estimated to ±0.7% (1 s.d.), so the band is ±3 s.d.
    rng = np.random.default_rng(2024)
    samples = rng.choice([1.0, 0.5, 0.0], p=[0.5, 0.2, 0.3], size=(1000, 200))
    covered = 0
    for i, sample in enumerate(samples):
        result = win_rate(sample, method=method, n_boot=1000, seed=i)
        covered += result.ci_low <= 0.6 <= result.ci_high
    assert low <= covered / len(samples) <= high


def test_bad_outcomes_name_the_index():
    with pytest.raises(DataError, match=r"outcomes\[2\].*not in \[0, 1\]"):
        win_rate([1.0, 0.5, 2.0])
    with pytest.raises(DataError, match="no outcomes"):
        win_rate([])
    with pytest.raises(ValueError, match="unknown interval method"):
        win_rate([1.0], method="exact")


def test_logistic_fit_on_a_saturated_two_group_design_by_hand():
    # Two groups with features ±1: with two parameters the fit reproduces both group means,
    # σ(θ₀ + θ₁) = 0.9 and σ(θ₀ − θ₁) = 0.5, so θ₀ = (logit .9 + logit .5)/2 = ln 3 and
    # θ₁ = (ln 9 − 0)/2 = ln 3. Group − is all ties (fractional targets).
    feature = np.array([1.0] * 10 + [-1.0] * 10)
    target = np.array([1.0] * 9 + [0.0] + [0.5] * 10)
    theta = fit_logistic(feature, target, np.ones((1, 20)))[0]
    assert theta == pytest.approx([math.log(3), math.log(3)], rel=1e-4)


def test_length_control_on_the_saturated_design():
    # Lengths differ by +10 or −10 words: s = 10, feature tanh(±1). Same two groups as above:
    # θ₀ = ln 3 whatever the feature's scale, so LC = σ(ln 3) = 0.75, raw = (9 + 5)/20 = 0.7.
    diff = np.array([10.0] * 10 + [-10.0] * 10)
    outcomes = [1.0] * 9 + [0.0] + [0.5] * 10
    lc = length_controlled_win_rate(outcomes, 100 + diff, np.full(20, 100.0), n_boot=200)
    assert lc.mean == pytest.approx(0.75, rel=1e-4)
    assert lc.raw.mean == pytest.approx(0.7)
    assert lc.length_scale == pytest.approx(10.0)
    assert lc.length_coef == pytest.approx(math.log(3) / math.tanh(1.0), rel=1e-4)


def length_biased_judgements(seed: int, n: int = 1000):
    """Outcomes that depend on the length difference only: P(win) = σ(3·tanh(d/80)), 10% of
    comparisons a tie, the model ~70 words longer on average. At d = 0 the model wins half."""
    rng = np.random.default_rng(seed)
    len_reference = rng.integers(40, 200, n).astype(float)
    len_model = np.maximum(len_reference + rng.normal(70, 60, n), 0.0)
    p_win = 1 / (1 + np.exp(-3 * np.tanh((len_model - len_reference) / 80)))
    u = rng.random(n)
    outcomes = np.where(u < 0.9 * p_win, 1.0, np.where(u < 0.9 * p_win + 0.1, 0.5, 0.0))
    return outcomes, len_model, len_reference


def test_length_controlled_win_rate_removes_a_pure_length_bias():
    outcomes, len_model, len_reference = length_biased_judgements(seed=0)
    lc = length_controlled_win_rate(outcomes, len_model, len_reference, n_boot=300)
    assert lc.raw.mean > 0.72  # the raw win rate is inflated by length alone
    assert lc.raw.ci_low > 0.7
    assert abs(lc.mean - 0.5) < 0.05
    assert lc.ci_low < 0.5 < lc.ci_high
    assert lc.length_coef > 1.0 and lc.transform == "tanh"


def test_length_control_keeps_a_real_quality_difference():
    # Same lengths as above, but the outcome ignores length: P(win) .65, tie .1 → 0.70.
    _, len_model, len_reference = length_biased_judgements(seed=1)
    outcomes = np.random.default_rng(5).choice([1.0, 0.5, 0.0], p=[0.65, 0.1, 0.25], size=1000)
    lc = length_controlled_win_rate(outcomes, len_model, len_reference, n_boot=300)
    assert abs(lc.mean - 0.7) < 0.04 and lc.ci_low < 0.7 < lc.ci_high
    assert abs(lc.mean - lc.raw.mean) < 0.03


def test_equal_lengths_reduce_to_the_raw_win_rate():
    lc = length_controlled_win_rate([1.0, 1.0, 0.5, 0.0], [5, 5, 5, 5], [5, 5, 5, 5], n_boot=100)
    assert lc.mean == pytest.approx(0.625, rel=1e-5) and lc.transform == "none"


def test_length_inputs_are_validated():
    with pytest.raises(DataError, match="len_reference.*2 lengths for 3 outcomes"):
        length_controlled_win_rate([1, 0, 1], [1, 2, 3], [1, 2])
    with pytest.raises(DataError, match=r"len_model\[1\]"):
        length_controlled_win_rate([1, 0], [1, -2], [1, 2])


def test_sign_test_hand_values():
    assert sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 1024)      # 0.0215
    assert sign_test(1, 9) == sign_test(9, 1)                          # two-sided
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0          # capped at 1; nothing decided
    assert sign_test(27, 13) == pytest.approx(0.0385, abs=1e-4)      # the demo's bar: p < 0.05 on 40 discordant
    with pytest.raises(ValueError):
        sign_test(-1, 2)
