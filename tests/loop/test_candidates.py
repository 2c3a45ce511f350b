"""Which prompts a round samples, and which pairs it shows."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.loop.candidates import ensemble_disagreement, prompt_window, select_pairs
from rlhfkit.rollout.prompts import RLPrompt


def test_rounds_take_fresh_prompts_until_the_pool_is_used_up():
    pool = [RLPrompt(()) for _ in range(10)]
    r1, r2, r3 = (prompt_window(pool, start, 4, seed=0) for start in (0, 4, 8))
    assert len(r1) == len(r2) == len(r3) == 4 and not set(r1) & set(r2)
    assert set(r1) | set(r2) | set(r3[:2]) == set(range(10))      # one full pass before any repeat
    assert r3[2:] == prompt_window(pool, 10, 2, seed=0)            # then the second pass begins
    assert prompt_window(pool, 4, 4, seed=0) == r2                 # deterministic
    assert prompt_window(pool, 0, 4, seed=1) != r1                 # the seed shuffles
    assert prompt_window(pool, 2, 5, seed=0) == (r1 + r2)[2:7]     # any window of the same order


def _samples():
    return [{"index": 0, "task_id": "t0", "prompt": [], "responses": ["a", "b", "c", "a", " "]},
            {"index": 1, "task_id": "t1", "prompt": [], "responses": ["x", "y"]}]


def test_random_pairs_are_distinct_non_empty_responses():
    pairs = select_pairs(_samples(), per_prompt=2, selection="random", round=1, seed=0)
    assert [p["id"] for p in pairs] == ["r1-00000", "r1-00001", "r1-00002"]
    first = [frozenset((p["a"], p["b"])) for p in pairs if p["index"] == 0]
    assert len(first) == 2 and all(s <= {"a", "b", "c"} and len(s) == 2 for s in first)
    assert [(p["a"], p["b"]) for p in pairs if p["index"] == 1] in ([("x", "y")], [("y", "x")])
    assert pairs == select_pairs(_samples(), per_prompt=2, selection="random", round=1, seed=0)


def test_decided_first_and_uncertain_put_those_pairs_first():
    decided = select_pairs(_samples()[:1], per_prompt=1, selection="decided_first", round=1, seed=0,
                           decided=lambda s, a, b: "c" in (a, b) and "a" in (a, b))
    assert {decided[0]["a"], decided[0]["b"]} == {"a", "c"}
    spread = {frozenset("ab"): 0.1, frozenset("ac"): 0.3, frozenset("bc"): 2.0, frozenset("xy"): 0.0}
    chosen = select_pairs(_samples(), per_prompt=1, selection="uncertain", round=1, seed=0,
                          uncertainty=lambda triples: [spread[frozenset((a, b))] for _s, a, b in triples])
    assert {chosen[0]["a"], chosen[0]["b"]} == {"b", "c"}
    with pytest.raises(ValueError, match="needs"):
        select_pairs(_samples(), per_prompt=1, selection="uncertain", round=1, seed=0)


def test_ensemble_disagreement():
    # 2 heads × 2 pairs: margins (1, 3) and (2, 2) → std over heads √2 and 0
    a = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    b = torch.zeros(2, 2)
    assert ensemble_disagreement(a, b) == pytest.approx([2 ** 0.5, 0.0])
    # one head: the closer to a coin flip, the more uncertain
    assert ensemble_disagreement(torch.tensor([[0.5, -3.0]]), torch.zeros(1, 2)) == pytest.approx([-0.5, -3.0])
