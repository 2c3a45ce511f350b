"""Both-order logic, verdict parsing, caching and RLAIF labels with a scripted judge."""

from __future__ import annotations

import math
import re

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import Conversation, prompt_text
from rlhfkit.judge.agreement import judge_agreement
from rlhfkit.judge.backends import ScriptedBackend
from rlhfkit.judge.cache import JudgeCache
from rlhfkit.judge.pairwise import (
    PairwiseJudge,
    fill_template,
    label_pairs_with_judge,
    load_template,
    parse_verdict,
)

TEMPLATE = "Q: {prompt}\nA: {response_a}\nB: {response_b}\nAnswer with 'Verdict: A|B|tie'."


def shown(conversation: Conversation) -> tuple[str, str]:
    """The two responses in the order the judge saw them (A first)."""
    match = re.search(r"\nA: (.*)\nB: (.*)\n", prompt_text(conversation))
    assert match, prompt_text(conversation)
    return match.group(1), match.group(2)


def prefers(word: str):
    """A consistent judge: picks whichever position holds `word`, else tie."""
    def fn(conversation: Conversation) -> str:
        first, second = shown(conversation)
        if first == word:
            return "A is better.\nVerdict: A"
        if second == word:
            return "B is better.\nVerdict: B"
        return "Verdict: tie"
    return fn


def test_consistent_judge_picks_the_same_response_in_both_orders():
    backend = ScriptedBackend(prefers("good"))
    judge = PairwiseJudge(backend, TEMPLATE)

    v = judge.judge("q", "good", "bad")  # (good, bad) → A; (bad, good) → B; both mean "a"
    assert (v.winner, v.p_a, v.consistent) == ("a", 1.0, True)
    assert [(r.order, r.choice, r.winner) for r in v.raw] == [("ab", "A", "a"), ("ba", "B", "a")]

    v = judge.judge("q", "bad", "good")
    assert (v.winner, v.p_a, v.consistent) == ("b", 0.0, True)

    v = judge.judge("q", "meh", "so-so")  # both orders say tie
    assert (v.winner, v.p_a, v.consistent) == ("tie", 0.5, True)
    assert backend.calls == 6


def test_disagreement_between_orders_is_a_tie():
    # Says A for (x, y) but tie for (y, x): a and tie disagree → tie, inconsistent.
    def fn(conversation):
        return "Verdict: A" if shown(conversation) == ("x", "y") else "Verdict: tie"
    v = PairwiseJudge(ScriptedBackend(fn), TEMPLATE).judge("q", "x", "y")
    assert (v.winner, v.p_a, v.consistent) == ("tie", 0.5, False)


def test_position_biased_judge_gives_only_ties_and_bias_one():
    judge = PairwiseJudge(ScriptedBackend(lambda c: "Verdict: A"), TEMPLATE)
    batch = judge.judge_many([("q1", "x", "y"), ("q2", "good", "bad"), ("q3", "u", "v")])
    assert [v.winner for v in batch.verdicts] == ["tie"] * 3
    assert batch.outcomes == [0.5, 0.5, 0.5]
    assert batch.position_bias == 1.0 and batch.second_position_bias == 0.0
    assert batch.n_inconsistent == 3 and batch.n_invalid == 0


def test_position_bias_is_a_fraction_of_the_batch():
    # Pair 1 from an order-blind judge, pair 2 always "A": bias = 1/2.
    def fn(conversation):
        return "Verdict: A" if "p2" in prompt_text(conversation) else prefers("good")(conversation)
    batch = PairwiseJudge(ScriptedBackend(fn), TEMPLATE).judge_many(
        [("p1", "good", "bad"), ("p2", "x", "y")])
    assert batch.position_bias == 0.5
    assert [v.winner for v in batch.verdicts] == ["a", "tie"]


def test_single_order_judging_sends_one_request():
    backend = ScriptedBackend(lambda c: "Verdict: B")
    v = PairwiseJudge(backend, TEMPLATE, both_orders=False).judge("q", "x", "y")
    assert (v.winner, v.consistent, len(v.raw)) == ("b", True, 1)
    assert backend.calls == 1
    batch = PairwiseJudge(backend, TEMPLATE, both_orders=False).judge_many([("q", "x", "y")])
    assert math.isnan(batch.position_bias)  # not measurable from one order


@pytest.mark.parametrize("text, choice", [
    ("Reasoning...\nVerdict: A", "A"),
    ("verdict: b", "B"),
    ("**Verdict:** Tie", "tie"),
    ("Verdict: [[B]]", "B"),
    ("Verdict - Answer A.", "A"),
    ("Verdict: A\nOn reflection...\nVerdict: B", "B"),     # the last verdict line decides
    ("Verdict: B\nA short afterword.", "B"),               # text after the verdict is allowed
    ("B", "B"),                                             # a bare answer
    ("Verdict: A or B", "invalid"),
    ("A is clearly better than B.", "invalid"),
    ("Verdict: answer", "invalid"),
    ("", "invalid"),
])
def test_parse_verdict(text, choice):
    assert parse_verdict(text) == choice


def test_invalid_outputs_are_counted_and_treated_as_ties():
    # (x, y): unparseable; (y, x): "B" (= x). invalid→tie vs x → disagreement → tie.
    def fn(conversation):
        return "I cannot decide" if shown(conversation) == ("x", "y") else "Verdict: B"
    batch = PairwiseJudge(ScriptedBackend(fn), TEMPLATE).judge_many([("q", "x", "y")])
    (v,) = batch.verdicts
    assert [r.choice for r in v.raw] == ["invalid", "B"]
    assert (v.winner, v.consistent) == ("tie", False)
    assert batch.n_invalid == 1 and batch.summary()["invalid_outputs"] == 1


def test_rerun_with_cache_makes_zero_backend_calls(tmp_path):
    items = [("q1", "good", "bad"), ("q2", "bad", "good"), ("q3", "good", "meh")]
    first_backend = ScriptedBackend(prefers("good"))
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        first = PairwiseJudge(first_backend, TEMPLATE, cache=cache).judge_many(items)
    assert first_backend.calls == 6 and first.n_backend_calls == 6

    # A fresh process: new cache handle, a backend that would fail if it were called.
    def must_not_be_called(conversation):
        raise AssertionError("backend called despite the cache")
    second_backend = ScriptedBackend(must_not_be_called)
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        assert len(cache) == 6
        second = PairwiseJudge(second_backend, TEMPLATE, cache=cache).judge_many(items)
    assert second_backend.calls == 0 and second.n_backend_calls == 0
    assert second.verdicts == first.verdicts

    # A different template is a different judge: every request misses.
    third_backend = ScriptedBackend(prefers("good"))
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        PairwiseJudge(third_backend, TEMPLATE + " ", cache=cache).judge_many(items)
    assert third_backend.calls == 6


def test_duplicate_requests_in_a_batch_are_sent_once():
    backend = ScriptedBackend(prefers("good"))
    batch = PairwiseJudge(backend, TEMPLATE).judge_many([("q", "good", "bad")] * 3)
    assert backend.calls == 2 and [v.winner for v in batch.verdicts] == ["a"] * 3


def test_label_pairs_with_judge_writes_ai_preference_pairs():
    backend = ScriptedBackend(prefers("good"), name="judge-v1")
    pairs, batch = label_pairs_with_judge(
        PairwiseJudge(backend, TEMPLATE),
        [("q1", "good", "bad"), ("q2", "bad", "good"), ("q3", "x", "y")], round=2)
    assert [(p.chosen, p.rejected, p.label) for p in pairs] == [
        ("good", "bad", 1.0), ("good", "bad", 1.0), ("x", "y", 0.5)]
    assert pairs[2].is_tie
    prov = pairs[0].provenance
    assert (prov.source, prov.annotator, prov.round) == ("ai", "judge-v1", 2)
    assert "Verdict: A" in prov.rationale and "Verdict: B" in prov.rationale
    assert pairs[0].meta["judge_choices"] == ["ab:A", "ba:B"]
    assert len(batch) == 3


def test_template_placeholders_are_filled_in_one_pass():
    # A response containing "{response_b}" must not be substituted again.
    text = fill_template(TEMPLATE, (), "{response_b}", "second")
    assert "A: {response_b}\nB: second" in text


def test_template_loading_errors_name_the_problem(tmp_path):
    assert "{response_a}" in load_template("pairwise")  # the built-in template
    path = tmp_path / "mine.txt"
    path.write_text("Compare {response_a} and {response_b}.")
    with pytest.raises(DataError, match=r"mine\.txt: field 'template'.*\{prompt\}"):
        load_template(path)
    with pytest.raises(DataError, match="not found"):
        load_template(str(tmp_path / "missing.txt"))


def test_bad_items_raise_data_errors():
    judge = PairwiseJudge(ScriptedBackend(lambda c: "Verdict: A"), TEMPLATE)
    with pytest.raises(DataError, match=r"items\[1\]"):
        judge.judge_many([("q", "a", "b"), ("q", "a")])
    with pytest.raises(DataError, match=r"items\[0\].*response_b"):
        judge.judge_many([{"prompt": "q", "response_a": "a"}])


def test_judge_agreement_by_hand():
    # judge [a, a, b, tie] vs human [a, b, b, tie]: 3 of 4 agree, p_o = 3/4.
    # Judge frequencies a 2/4, b 1/4, tie 1/4; human a 1/4, b 2/4, tie 1/4.
    # p_e = 2/16 + 2/16 + 1/16 = 5/16; κ = (12/16 − 5/16) / (11/16) = 7/11.
    # Pairs neither called a tie: (a,a), (a,b), (b,b) → 2/3.
    result = judge_agreement(["a", "a", "b", "tie"], [1.0, 0.0, "b", 0.5])
    assert result["n"] == 4
    assert result["agreement"] == pytest.approx(0.75)
    assert result["cohen_kappa"] == pytest.approx(7 / 11)
    assert result["agreement_decided"] == pytest.approx(2 / 3)
    assert result["confusion"]["a"] == {"a": 1, "b": 1, "tie": 0}

    perfect = judge_agreement(["a", "b"], ["a", "b"])
    assert perfect["cohen_kappa"] == pytest.approx(1.0)
    # Both raters used one category only: κ is undefined.
    assert math.isnan(judge_agreement(["a", "a"], ["a", "a"])["cohen_kappa"])
    with pytest.raises(DataError, match="same pairs"):
        judge_agreement(["a"], ["a", "b"])
    with pytest.raises(DataError, match=r"human_labels\[0\]"):
        judge_agreement(["a"], ["maybe"])


# ----------------------------------------------------------------------------- scored (logprob) mode

def scored(preference: dict[str, float], bias: float, noise: dict[tuple[str, str], float] | None = None):
    """A scoring judge: log P(A) − log P(B) = q(first) − q(second) + bias (+ noise per shown order)."""
    def score_fn(conversation, prefix, choices):
        assert prefix == "Verdict:" and tuple(choices) == (" A", " B")
        first, second = shown(conversation)
        s = preference.get(first, 0.0) - preference.get(second, 0.0) + bias
        s += (noise or {}).get((first, second), 0.0)
        return [s, 0.0]
    return score_fn


def test_logprob_mode_cancels_a_constant_position_bias():
    # A judge that would answer "A" every time (bias +5 nats) but whose log-probs still carry
    # a preference: good > ok > bad. Verdict mode: all ties; logprob mode: the preference.
    prefs = {"good": 1.0, "ok": 0.0, "bad": -1.0}
    backend = ScriptedBackend(lambda c: "Verdict: A", score_fn=scored(prefs, bias=5.0))
    items = [("q1", "good", "bad"), ("q2", "bad", "ok"), ("q3", "ok", "ok")]
    assert [v.winner for v in PairwiseJudge(backend, TEMPLATE).judge_many(items).verdicts] == ["tie"] * 3
    batch = PairwiseJudge(backend, TEMPLATE, mode="logprob").judge_many(items)
    assert [v.winner for v in batch.verdicts] == ["a", "b", "tie"]
    # s_ab = q_a − q_b + 5, s_ba = q_b − q_a + 5: offset c = 5; score = (s_ab − s_ba)/2 = q_a − q_b
    assert batch.position_offset == pytest.approx(5.0)
    assert [v.score for v in batch.verdicts] == pytest.approx([2.0, -1.0, 0.0])
    assert batch.position_bias == 1.0  # raw: the first answer had the higher log-prob every time
    assert batch.outcomes == [1.0, 0.0, 0.5]


def test_logprob_mode_orders_that_disagree_after_the_offset_are_a_tie():
    # Pair 1 (good, bad): s_ab = 2, s_ba = −2. Pair 2 (x, y), order-dependent noise: s_ab = 3, s_ba = 1.
    # Offset c = mean((2 − 2)/2, (3 + 1)/2) = 1. Pair 1: e_ab = 1, e_ba = 3 → a.
    # Pair 2: e_ab = 3 − 1 = 2 favours x, e_ba = −(1 − 1) = 0 does not → the orders disagree → tie.
    backend = ScriptedBackend(lambda c: "", score_fn=scored({"good": 1, "bad": -1}, 0.0,
                                                            {("x", "y"): 3.0, ("y", "x"): 1.0}))
    batch = PairwiseJudge(backend, TEMPLATE, mode="logprob").judge_many([("p1", "good", "bad"), ("p2", "x", "y")])
    assert batch.position_offset == pytest.approx(1.0)
    v1, v2 = batch.verdicts
    assert v1.winner == "a" and v1.consistent
    assert v2.winner == "tie" and not v2.consistent and batch.n_inconsistent == 1
    assert v2.score == pytest.approx(1.0)  # (s_ab − s_ba)/2 = (3 − 1)/2


def test_logprob_mode_is_cached_and_needs_a_scoring_backend(tmp_path):
    backend = ScriptedBackend(lambda c: "", score_fn=scored({"good": 1}, 2.0))
    cache = JudgeCache(tmp_path / "c.sqlite")
    first = PairwiseJudge(backend, TEMPLATE, mode="logprob", cache=cache).judge_many([("q", "good", "bad")])
    calls = backend.calls
    again = PairwiseJudge(backend, TEMPLATE, mode="logprob", cache=cache).judge_many([("q", "good", "bad")])
    assert backend.calls == calls == 2 and again.n_backend_calls == 0
    assert again.verdicts[0].score == first.verdicts[0].score
    # the verdict-mode cache entries are separate: a verdict run still asks the backend
    PairwiseJudge(backend, TEMPLATE, cache=cache).judge_many([("q", "good", "bad")])
    assert backend.calls == 4
    from rlhfkit.judge.backends import JudgeError, OpenAICompatibleBackend

    with pytest.raises(JudgeError, match="cannot score"):  # scripted, but without a score_fn
        PairwiseJudge(ScriptedBackend(lambda c: ""), TEMPLATE, mode="logprob").judge("q", "a", "b")
    with OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", api_key_env=None) as http:
        with pytest.raises(ValueError, match="cannot score answers"):  # no log-probs over HTTP here
            PairwiseJudge(http, TEMPLATE, mode="logprob")


def test_resolve_judge_mode():
    from rlhfkit.config import ConfigError
    from rlhfkit.judge.backends import OpenAICompatibleBackend
    from rlhfkit.judge.pairwise import resolve_judge_mode

    scripted = ScriptedBackend(lambda c: "")
    assert resolve_judge_mode("auto", scripted) == "verdict" and resolve_judge_mode("logprob", scripted) == "logprob"
    with OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", api_key_env=None) as http:
        assert resolve_judge_mode("auto", http) == "verdict"
        with pytest.raises(ConfigError, match="cannot score"):
            resolve_judge_mode("logprob", http)
    with pytest.raises(ConfigError, match="auto, verdict or logprob"):
        resolve_judge_mode("vibes", scripted)
