"""Inter-annotator agreement on nominal labels, with missing data.

Everything here is pure: the input is a ratings table

    table[unit][rater] = category

(a dict of dicts; a rater who did not rate a unit is simply absent), the output numbers.
A statistic that is undefined on the given table (no unit rated twice, or a single
category used by everyone so chance agreement is 1) is `nan`, never a made-up value.

Notation: u a unit, m_u the number of ratings it has, n_uc how many of them are c.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations

Table = Mapping[Hashable, Mapping[Hashable, Hashable]]
NAN = float("nan")


def _ratings_per_unit(table: Table) -> list[Counter]:
    """Category counts n_uc for every unit with at least two ratings (the only pairable ones)."""
    return [Counter(ratings.values()) for ratings in table.values() if len(ratings) >= 2]


def raters(table: Table) -> list[Hashable]:
    return sorted({r for ratings in table.values() for r in ratings}, key=str)


def percent_agreement(table: Table) -> float:
    """Share of agreeing pairs among all pairs of ratings of the same unit.

    Σ_u Σ_c n_uc(n_uc−1)/2  /  Σ_u m_u(m_u−1)/2, over units with m_u ≥ 2.
    """
    agreeing = pairs = 0
    for counts in _ratings_per_unit(table):
        m = sum(counts.values())
        pairs += m * (m - 1) // 2
        agreeing += sum(n * (n - 1) // 2 for n in counts.values())
    return agreeing / pairs if pairs else NAN


def cohen_kappa_of_labels(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's κ of two raters' labels of the same units, in the same order.

    κ = (p_o − p_e) / (1 − p_e), p_o the share of units where they agree,
    p_e = Σ_c p_a(c)·p_b(c) with p_x(c) the share of x's labels that are c
    (nan without units, or when p_e = 1: both used one category and chance explains everything).
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(f"{len(labels_a)} labels against {len(labels_b)}: they must describe the same units")
    n = len(labels_a)
    if not n:
        return NAN
    p_observed = sum(a == b for a, b in zip(labels_a, labels_b)) / n
    counts_a = Counter(labels_a)
    counts_b = Counter(labels_b)
    p_chance = sum(counts_a[c] * counts_b[c] for c in counts_a) / (n * n)
    if math.isclose(p_chance, 1.0):
        return NAN
    return (p_observed - p_chance) / (1.0 - p_chance)


def cohen_kappa(table: Table, rater_a: Hashable, rater_b: Hashable) -> float:
    """Cohen's κ between two raters over the units both rated (`cohen_kappa_of_labels`)."""
    shared = [(r[rater_a], r[rater_b]) for r in table.values() if rater_a in r and rater_b in r]
    return cohen_kappa_of_labels([a for a, _ in shared], [b for _, b in shared])


def pairwise_cohen_kappa(table: Table, min_shared: int = 2) -> dict[tuple[Hashable, Hashable], float]:
    """Cohen's κ for every pair of raters who share at least `min_shared` units."""
    result = {}
    for a, b in combinations(raters(table), 2):
        shared = sum(1 for r in table.values() if a in r and b in r)
        if shared >= min_shared:
            result[(a, b)] = cohen_kappa(table, a, b)
    return result


def mean_cohen_kappa(table: Table, min_shared: int = 2) -> float:
    """The mean of the defined pairwise Cohen's κ (Light's κ, generalized to missing data)."""
    values = [k for k in pairwise_cohen_kappa(table, min_shared).values() if not math.isnan(k)]
    return sum(values) / len(values) if values else NAN


def fleiss_kappa(table: Table) -> float:
    """Fleiss' κ, allowing a different number of ratings per unit.

    P_u = Σ_c n_uc(n_uc−1) / (m_u(m_u−1))   (agreement within unit u)
    P̄ = mean of P_u over units with m_u ≥ 2
    p_c = Σ_u n_uc / Σ_u m_u,  P_e = Σ_c p_c²
    κ = (P̄ − P_e) / (1 − P_e)
    With the same m for every unit this is exactly Fleiss (1971).
    """
    units = _ratings_per_unit(table)
    if not units:
        return NAN
    agreement_per_unit = []
    totals: Counter = Counter()
    for counts in units:
        m = sum(counts.values())
        agreement_per_unit.append(sum(n * (n - 1) for n in counts.values()) / (m * (m - 1)))
        totals.update(counts)
    p_mean = sum(agreement_per_unit) / len(agreement_per_unit)
    all_ratings = sum(totals.values())
    p_chance = sum((n / all_ratings) ** 2 for n in totals.values())
    if math.isclose(p_chance, 1.0):
        return NAN
    return (p_mean - p_chance) / (1.0 - p_chance)


def krippendorff_alpha_nominal(table: Table) -> float:
    """Krippendorff's α for nominal data, missing ratings allowed.

    Coincidences: every ordered pair of ratings (c, k) from two different raters of unit u
    adds 1/(m_u − 1) to o_ck (units with m_u < 2 cannot be paired and are left out).
    n_c = Σ_k o_ck, n = Σ_c n_c (the number of pairable ratings).
    D_o = Σ_{c≠k} o_ck / n,  D_e = Σ_{c≠k} n_c·n_k / (n(n − 1)),  α = 1 − D_o / D_e.
    """
    coincidences: Counter = Counter()
    for counts in _ratings_per_unit(table):
        m = sum(counts.values())
        for c, n_c in counts.items():
            for k, n_k in counts.items():
                ordered_pairs = n_c * (n_c - 1) if c == k else n_c * n_k
                coincidences[(c, k)] += ordered_pairs / (m - 1)
    marginals: Counter = Counter()
    for (c, _k), o in coincidences.items():
        marginals[c] += o
    n = sum(marginals.values())
    if n <= 1:
        return NAN
    disagree_observed = sum(o for (c, k), o in coincidences.items() if c != k) / n
    disagree_expected = sum(marginals[c] * marginals[k] for c in marginals for k in marginals
                            if c != k) / (n * (n - 1))
    if disagree_expected == 0:
        return NAN
    return 1.0 - disagree_observed / disagree_expected


def majority_agreement(table: Table) -> dict[Hashable, tuple[float, int]]:
    """For each rater: (share of their ratings equal to the others' majority, units counted).

    On a unit, the others' majority is the category the *other* raters chose most often,
    counted only when it is unique (no tie for first) — so a rater is compared with the
    consensus without their own vote in it.
    """
    hits: Counter = Counter()
    counted: Counter = Counter()
    for ratings in table.values():
        for rater, category in ratings.items():
            others = Counter(c for r, c in ratings.items() if r != rater)
            top = others.most_common(2)
            if not top or (len(top) == 2 and top[0][1] == top[1][1]):
                continue
            counted[rater] += 1
            hits[rater] += category == top[0][0]
    return {r: (hits[r] / counted[r], counted[r]) for r in counted}


def flag_low(scores: Mapping[Hashable, tuple[float, int]], *, gap: float = 0.25,
             min_count: int = 3) -> set[Hashable]:
    """Raters whose score is more than `gap` below the median score of their peers.

    `scores[rater] = (score, count)`; raters with fewer than `min_count` observations are
    neither judged nor part of the median, and at least two judged raters are needed.
    """
    judged = {r: s for r, (s, n) in scores.items() if n >= min_count and not math.isnan(s)}
    if len(judged) < 2:
        return set()
    median = statistics.median(judged.values())
    return {r for r, s in judged.items() if s < median - gap}
