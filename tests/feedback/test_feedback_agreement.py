"""Agreement statistics against values computed by hand (arithmetic in the comments) and
against the worked examples published with Fleiss' κ and Krippendorff's α."""

import math

import pytest

from rlhfkit.feedback.agreement import (
    cohen_kappa,
    flag_low,
    fleiss_kappa,
    krippendorff_alpha_nominal,
    majority_agreement,
    mean_cohen_kappa,
    pairwise_cohen_kappa,
    percent_agreement,
)


def table_from_columns(columns: dict[str, list]) -> dict:
    """{rater: [category or None per unit]} -> table[unit][rater]."""
    units = len(next(iter(columns.values())))
    return {u: {r: values[u] for r, values in columns.items() if values[u] is not None} for u in range(units)}


# Two raters, 10 units, yes/no:
#             R2=Y  R2=N
#   R1=Y        4     2      R1: 6 Y, 4 N
#   R1=N        1     3      R2: 5 Y, 5 N
# p_o = (4+3)/10 = 0.7;  p_e = 0.6·0.5 + 0.4·0.5 = 0.5;  κ = (0.7−0.5)/(1−0.5) = 0.4
COHEN = table_from_columns({
    "r1": list("YYYYYYNNNN"),
    "r2": list("YYYYNNYNNN"),
})

# Three raters, 4 units, categories a/b (no missing ratings):
#   u1 a a a: Σ n(n−1) = 3·2 = 6 -> P = 6/6 = 1
#   u2 a a b: 2·1 + 1·0 = 2      -> P = 2/6 = 1/3
#   u3 a b b:                    -> P = 1/3
#   u4 b b b:                    -> P = 1
#   P̄ = (1 + 1/3 + 1/3 + 1)/4 = 2/3;  p_a = 6/12, p_b = 6/12, P_e = 1/4 + 1/4 = 1/2
#   Fleiss κ = (2/3 − 1/2)/(1 − 1/2) = 1/3
#   percent agreement: agreeing pairs 3+1+1+3 = 8 of 4·3 = 12 -> 2/3
FLEISS = table_from_columns({
    "x": list("aaab"),
    "y": list("aabb"),
    "z": list("abbb"),
})

# Three raters, 4 units, with missing ratings (None):
#   u1: a a -       u2: a b b       u3: b b b       u4: a - -   (u4 cannot be paired)
# Coincidences o_ck (each ordered pair of ratings in u adds 1/(m_u − 1)):
#   u1 (m=2): (a,a)×2 / 1            -> o_aa += 2
#   u2 (m=3): (a,b)×2, (b,a)×2, (b,b)×2, each / 2 -> o_ab += 1, o_ba += 1, o_bb += 1
#   u3 (m=3): (b,b)×6 / 2            -> o_bb += 3
#   o_aa = 2, o_ab = o_ba = 1, o_bb = 4;  n_a = 3, n_b = 5, n = 8
#   D_o = (o_ab + o_ba)/n = 2/8;  D_e = (n_a n_b + n_b n_a)/(n(n−1)) = 30/56
#   α = 1 − (2/8)/(30/56) = 1 − 14/30 = 8/15
# Percent agreement: u1 1 of 1 pair, u2 1 of 3 (b,b), u3 3 of 3 -> 5/7
MISSING = table_from_columns({
    "x": ["a", "a", "b", "a"],
    "y": ["a", "b", "b", None],
    "z": [None, "b", "b", None],
})


def test_cohen_kappa_by_hand():
    assert cohen_kappa(COHEN, "r1", "r2") == pytest.approx(0.4)
    assert cohen_kappa(COHEN, "r2", "r1") == pytest.approx(0.4)


def test_cohen_kappa_uses_only_shared_units():
    # MISSING, x vs y share u1..u3: (a,a), (a,b), (b,b) -> p_o = 2/3
    # x: a,a,b (p_a 2/3, p_b 1/3); y: a,b,b (p_a 1/3, p_b 2/3) -> p_e = 2/9 + 2/9 = 4/9
    # κ = (2/3 − 4/9)/(1 − 4/9) = (2/9)/(5/9) = 0.4
    assert cohen_kappa(MISSING, "x", "y") == pytest.approx(0.4)
    # y vs z share u2, u3: (b,b), (b,b) -> everyone says b, p_e = 1: undefined
    assert math.isnan(cohen_kappa(MISSING, "y", "z"))


def test_pairwise_and_mean_cohen_kappa():
    # FLEISS: x=aaab, y=aabb, z=abbb.
    # x,y: p_o = 3/4; x: 3a 1b, y: 2a 2b -> p_e = (3·2 + 1·2)/16 = 1/2; κ = (3/4−1/2)/(1/2) = 1/2
    # y,z: p_o = 3/4; y: 2a 2b, z: 1a 3b -> p_e = (2 + 6)/16 = 1/2; κ = 1/2
    # x,z: p_o = 2/4; x: 3a 1b, z: 1a 3b -> p_e = (3 + 3)/16 = 3/8; κ = (1/2−3/8)/(5/8) = 1/5
    kappas = pairwise_cohen_kappa(FLEISS)
    assert kappas == pytest.approx({("x", "y"): 0.5, ("x", "z"): 0.2, ("y", "z"): 0.5})
    assert mean_cohen_kappa(FLEISS) == pytest.approx(1.2 / 3)


def test_fleiss_kappa_by_hand():
    assert fleiss_kappa(FLEISS) == pytest.approx(1 / 3)


def test_fleiss_kappa_published_example():
    # Fleiss (1971) as reproduced in most textbooks: 10 subjects, 14 raters, 5 categories,
    # rows give how many raters chose each category; κ = 0.210.
    rows = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    table = {}
    for unit, counts in enumerate(rows):
        labels = [category for category, n in enumerate(counts) for _ in range(n)]
        table[unit] = dict(enumerate(labels))
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)


def test_krippendorff_alpha_by_hand_with_missing_data():
    assert krippendorff_alpha_nominal(MISSING) == pytest.approx(8 / 15)


def test_krippendorff_alpha_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers,
    # 12 units, missing values; nominal α = 0.743.
    table = table_from_columns({
        "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    })
    assert krippendorff_alpha_nominal(table) == pytest.approx(0.743, abs=5e-4)


def test_percent_agreement_by_hand():
    assert percent_agreement(FLEISS) == pytest.approx(2 / 3)
    assert percent_agreement(MISSING) == pytest.approx(5 / 7)
    assert percent_agreement(COHEN) == pytest.approx(0.7)


def test_undefined_statistics_are_nan():
    single = {0: {"x": "a"}, 1: {"y": "b"}}  # no unit rated twice
    assert math.isnan(percent_agreement(single))
    assert math.isnan(fleiss_kappa(single))
    assert math.isnan(krippendorff_alpha_nominal(single))
    assert math.isnan(mean_cohen_kappa(single))
    unanimous = {0: {"x": "a", "y": "a"}, 1: {"x": "a", "y": "a"}}  # chance agreement is 1
    assert math.isnan(fleiss_kappa(unanimous))
    assert math.isnan(krippendorff_alpha_nominal(unanimous))
    assert percent_agreement(unanimous) == 1.0


def test_perfect_agreement_gives_one():
    table = {0: {"x": "a", "y": "a"}, 1: {"x": "b", "y": "b"}}
    assert fleiss_kappa(table) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal(table) == pytest.approx(1.0)
    assert cohen_kappa(table, "x", "y") == pytest.approx(1.0)


def test_majority_agreement_leaves_the_rater_out():
    # FLEISS, x=aaab, y=aabb, z=abbb.
    # x: others' majority per unit: u1 (a,a)->a hit; u2 (a,b) tie, skipped; u3 (b,b)->b miss (x=a);
    #    u4 (b,b)->b hit  => 2/3
    # y: u1 (a,a) hit; u2 (a,b) skipped; u3 (a,b) skipped; u4 (b,b) hit => 2/2
    # z: u1 (a,a) hit; u2 (a,a)->a miss (z=b); u3 (a,b) skipped; u4 hit => 2/3
    result = majority_agreement(FLEISS)
    assert result["x"] == pytest.approx((2 / 3, 3))
    assert result["y"] == pytest.approx((1.0, 2))
    assert result["z"] == pytest.approx((2 / 3, 3))


def test_flag_low_uses_median_gap_and_minimum_count():
    scores = {"a": (0.9, 10), "b": (0.85, 10), "c": (0.8, 10), "d": (0.4, 10), "e": (0.1, 2)}
    # median of a..d (e has too few) = (0.85 + 0.8)/2 = 0.825; threshold 0.575 -> d only
    assert flag_low(scores, gap=0.25, min_count=3) == {"d"}
    assert flag_low({"a": (0.1, 10)}) == set()  # nobody to compare with
