"""Preference data utilities: ranking expansion with ties, pooling, splits, dedupe, unpaired."""

import pytest

from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.preference import (
    dedupe,
    pairs_to_unpaired,
    pool_soft_labels,
    ranking_to_pairs,
    split_by_prompt,
)
from rlhfkit.data.schemas import (
    Message,
    PreferencePair,
    Provenance,
    Ranking,
    UnpairedFeedback,
    as_conversation,
)

PROMPT = as_conversation("What is 2 + 2?")
ALICE = Provenance(annotator="alice", source="human", round=1)
BOB = Provenance(annotator="bob", source="human", round=1)


def pair(chosen, rejected, label=1.0, provenance=ALICE, **kw):
    return PreferencePair(PROMPT, chosen, rejected, label=label, provenance=provenance, **kw)


# --------------------------------------------------------------------------- rankings

def test_ranking_with_tie_expands_to_six_pairs():
    # D > C > A = B over [A, B, C, D] → ranks (2, 2, 1, 0); all 4·3/2 = 6 pairs, in index
    # order (A,B) (A,C) (A,D) (B,C) (B,D) (C,D); A = B is kept as a tie with label 0.5.
    ranking = Ranking(PROMPT, ("A", "B", "C", "D"), (2, 2, 1, 0), both_bad=False,
                      provenance=ALICE, meta={"id": 7})
    pairs = ranking_to_pairs(ranking)
    assert [(p.chosen, p.rejected, p.label) for p in pairs] == [
        ("A", "B", 0.5), ("C", "A", 1.0), ("D", "A", 1.0),
        ("C", "B", 1.0), ("D", "B", 1.0), ("D", "C", 1.0),
    ]
    assert sum(p.is_tie for p in pairs) == 1
    assert all(p.provenance == ALICE and p.prompt == PROMPT for p in pairs)
    assert pairs[1].meta == {"id": 7, "ranking_indices": (2, 0)}
    no_ties = ranking_to_pairs(ranking, include_ties=False)
    assert len(no_ties) == 5 and not any(p.is_tie for p in no_ties)


def test_ranking_carries_both_bad_and_skips_identical_responses():
    skips = SkipReport()
    ranking = Ranking(PROMPT, ("x", "x", "y"), (0, 1, 2), both_bad=True)
    pairs = ranking_to_pairs(ranking, skips=skips)
    assert [(p.chosen, p.rejected) for p in pairs] == [("x", "y"), ("x", "y")]
    assert all(p.both_bad for p in pairs)
    assert skips.counts == {"identical responses": 1}


def test_bad_ranking_raises_data_error_with_location():
    bad = Ranking(PROMPT, ("A", "B"), (0,), meta={"path": "r.jsonl", "line": 3})
    with pytest.raises(DataError, match=r"r.jsonl:3: field 'ranks'"):
        ranking_to_pairs(bad)
    with pytest.raises(DataError, match="integers"):
        ranking_to_pairs(Ranking(PROMPT, ("A", "B"), (0, -1)))
    with pytest.raises(DataError, match="at least 2"):
        ranking_to_pairs(Ranking(PROMPT, ("A",), (0,)))


# --------------------------------------------------------------------------- pooling

def test_pool_soft_labels_orients_and_averages_votes():
    carol = Provenance(annotator="carol", source="ai", round=1)
    votes = [
        pair("A", "B", provenance=ALICE, margin=2.0),            # A ≻ B
        pair("B", "A", provenance=BOB, margin=1.0),              # B ≻ A
        pair("A", "B", label=0.5, provenance=carol, margin=0.0), # tie
        pair("B", "A", provenance=carol),                        # B ≻ A, no margin
        pair("P", "Q", provenance=ALICE),                        # another comparison
    ]
    pooled = pool_soft_labels(votes)
    assert len(pooled) == 2
    first = pooled[0]
    # P(A ≻ B) per vote: 1, 0, 0.5, 0 → mean 0.375 < 0.5, so B is chosen with label 0.625
    assert (first.chosen, first.rejected) == ("B", "A")
    assert first.label == pytest.approx(0.625)
    # margins signed toward B: −2 (A vote), +1 (B vote), 0 (tie) → mean −1/3
    assert first.margin == pytest.approx(-1 / 3)
    assert first.meta["num_votes"] == 4
    assert [p["annotator"] for p in first.meta["provenance"]] == ["alice", "bob", "carol", "carol"]
    # annotators disagree → None; source disagrees → "unknown"; round agrees → kept
    assert first.provenance == Provenance(annotator=None, source="unknown", round=1)
    second = pooled[1]
    assert (second.chosen, second.rejected, second.label, second.margin) == ("P", "Q", 1.0, None)
    assert second.provenance == ALICE


def test_pool_soft_labels_exact_tie_keeps_first_order_and_majority_both_bad():
    votes = [pair("A", "B", both_bad=True), pair("B", "A", provenance=BOB, both_bad=True),
             pair("A", "B", label=0.5, provenance=Provenance(annotator="carol"))]
    (pooled,) = pool_soft_labels(votes)
    assert (pooled.chosen, pooled.label, pooled.both_bad) == ("A", 0.5, True)
    (single_bad,) = pool_soft_labels(votes[:1] + [pair("A", "B", provenance=BOB)])
    assert not single_bad.both_bad   # 1 of 2 votes is not a majority


def test_pool_keeps_different_prompts_apart():
    other = PreferencePair(as_conversation("What is 3 + 3?"), "A", "B")
    assert len(pool_soft_labels([pair("A", "B"), other])) == 2


# --------------------------------------------------------------------------- split, dedupe

def test_split_by_prompt_is_disjoint_deterministic_and_complete():
    records = [PreferencePair(as_conversation(f"question {i}"), f"good {k}", "bad")
               for i in range(200) for k in range(3)]
    train, test = split_by_prompt(records, test_fraction=0.25, seed=1)
    train_prompts = {r.prompt for r in train}
    test_prompts = {r.prompt for r in test}
    assert not train_prompts & test_prompts
    assert len(train) + len(test) == len(records)
    assert 25 <= len(test_prompts) <= 75          # 50 expected of 200 prompts
    assert split_by_prompt(records, 0.25, seed=1) == (train, test)
    assert split_by_prompt(records, 0.25, seed=2) != (train, test)
    # a prompt's split does not depend on the other records (stable across data rounds)
    _, later_test = split_by_prompt(records[:30], 0.25, seed=1)
    assert {r.prompt for r in later_test} <= test_prompts
    assert split_by_prompt(records, 0.0)[1] == [] and split_by_prompt(records, 1.0)[0] == []
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_prompt(records, 1.5)


def test_split_keys_on_the_prompt_text_for_every_record_type():
    system_variant = (Message("system", "be brief"), Message("user", "question 0"))
    records = [PreferencePair(as_conversation("question 0"), "a", "b"),
               UnpairedFeedback(system_variant, "a", desirable=True)]
    for fraction in (0.1, 0.5, 0.9):
        train, test = split_by_prompt(records, fraction, seed=3)
        assert len(train) in (0, 2)


def test_dedupe_removes_exact_repeats_but_keeps_other_annotators_votes():
    records = [pair("A", "B"), pair("A", "B", meta={"line": 9}), pair("A", "B", provenance=BOB),
               pair("A", "B", label=0.5)]
    kept, removed = dedupe(records)
    assert removed == 1
    assert kept == [records[0], records[2], records[3]]
    assert kept[0].meta == {}   # the first occurrence is the one kept


# --------------------------------------------------------------------------- unpaired

def test_pairs_to_unpaired():
    pairs = [pair("A", "B"), pair("C", "D", label=0.5), pair("E", "F", both_bad=True),
             pair("G", "H", label=0.2)]
    feedback, ties = pairs_to_unpaired(pairs)
    assert ties == 1
    assert [(f.response, f.desirable) for f in feedback] == [
        ("A", True), ("B", False),      # chosen desirable, rejected undesirable
        ("E", False), ("F", False),     # both bad: neither is desirable
        ("G", False), ("H", True),      # label 0.2: annotators preferred `rejected`
    ]
    assert feedback[0].provenance == ALICE and feedback[1].meta["pair_role"] == "rejected"
