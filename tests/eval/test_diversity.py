"""Diversity: distinct-n, self-similarity and lengths, checked by hand."""

from __future__ import annotations

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.eval.diversity import distinct_n, diversity_report, self_similarity


def test_distinct_n_by_hand():
    responses = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran → 6 total, {the, cat, sat, ran} = 4 distinct
    assert distinct_n(responses, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) → 4 total, 3 distinct
    assert distinct_n(responses, 2) == pytest.approx(3 / 4)
    # trigrams: (the cat sat) (the cat ran) → 2 total, 2 distinct
    assert distinct_n(responses, 3) == 1.0
    # n-grams do not cross response boundaries: "sat the" is not a bigram here.
    assert distinct_n(["a b", "a b", "c"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["one", "two"], 3) == 0.0  # no trigram at all


def test_self_similarity_by_hand():
    # Sets of 1..3-grams: {the, cat, sat, the cat, cat sat, the cat sat} and
    # {the, cat, ran, the cat, cat ran, the cat ran}: 3 shared of 9 → Jaccard 1/3.
    assert self_similarity(["the cat sat", "the cat ran"]) == pytest.approx(1 / 3)
    # Three responses: pairs (1,2) = 1/3, (1,3) = 0, (2,3) = 0 → mean 1/9.
    assert self_similarity(["the cat sat", "the cat ran", "dogs bark"]) == pytest.approx(1 / 9)
    assert self_similarity(["x y", "p q"]) == 0.0
    assert self_similarity(["", ""]) == 1.0


def test_collapsed_responses():
    collapsed = ["I am a helpful assistant"] * 4
    assert self_similarity(collapsed) == 1.0
    # 5 distinct unigrams among 20 → 0.25; 4 distinct bigrams among 16 → 0.25.
    assert distinct_n(collapsed, 1) == pytest.approx(0.25)
    assert distinct_n(collapsed, 2) == pytest.approx(0.25)


def test_sampled_pairs_estimate_the_mean():
    # 40 responses, 780 pairs; half identical ("a b c"), half unique words.
    # Exact mean: C(20,2)=190 identical pairs with 1.0, every other pair 0 → 190/780.
    responses = ["a b c"] * 20 + [f"w{i} v{i}" for i in range(20)]
    exact = self_similarity(responses)
    assert exact == pytest.approx(190 / 780)
    sampled = self_similarity(responses, max_pairs=5000, seed=1)
    assert sampled == pytest.approx(exact, abs=0.03)


def test_report_with_and_without_a_tokenizer():
    responses = ["the cat sat", "the cat ran", "dogs bark loudly today"]
    report = diversity_report(responses)
    assert report.n_responses == 3
    # 10 words, 8 distinct: the cat sat ran dogs bark loudly today
    assert report.distinct[1] == pytest.approx(8 / 10)
    assert report.mean_words == pytest.approx(10 / 3) and report.median_words == 3.0
    assert report.mean_tokens is None

    class CharTokenizer:  # one token per character; specials would be added on request only
        def encode(self, text, add_special_tokens=True):
            return list(text) + (["<eos>"] if add_special_tokens else [])

    with_tokens = diversity_report(responses, tokenizer=CharTokenizer())
    # character counts 11, 11, 22 → mean 44/3, median 11
    assert with_tokens.mean_tokens == pytest.approx(44 / 3) and with_tokens.median_tokens == 11.0
    assert with_tokens.to_dict()["distinct_2"] == report.distinct[2]


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="one string"):
        distinct_n("the cat sat", 1)
    with pytest.raises(DataError, match="no responses"):
        diversity_report([])
    with pytest.raises(DataError, match=r"responses\[1\]"):
        self_similarity(["ok", None])
