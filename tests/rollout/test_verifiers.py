"""Rule verifiers: exact answers, format, length, code extraction and test scoring."""

from __future__ import annotations

import math
import re

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.rollout.rewards import RewardSource, Sample
from rlhfkit.rollout.verifiers import (
    CodeExecutionReward,
    ExactAnswerReward,
    FormatReward,
    LengthReward,
    answers_match,
    extract_code,
)
from rlhfkit.tasks.check import extract_final_answer


def s(response: str, **meta) -> Sample:
    return Sample(prompt="q", response=response, meta=meta)


# --------------------------------------------------------------------------------------
# Exact answers
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7, times 2 is 14. Answer: 14", "14"),
    ("answer: 5\nAnswer: **1,000.**\nthanks", "1,000."),   # the last marker, its first line
    ("ANSWER : Paris", "Paris"),
    ("**Answer:** 12", "12"),
    ("we have 2 apples and 10 pears, so 12", "12"),          # no marker: last number
    ("total -3.5 then 1,234", "1,234"),
    ("no numbers here", None),
    ("Answer:", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("predicted, gold, same", [
    ("12.0", "12", True),
    ("1,000", "1000", True),
    ("**1,000.**", "1000", True),
    ("$12$", "12", True),
    ("0.5", "1/2", True),
    ("-3", "-3.00", True),
    ("1e3", "1000", False),          # no exponents: compared as text
    ("12", "13", False),
    ("1,00", "100", False),          # not a thousands separator: compared as text
    (" Paris. ", "paris", True),
    ("New  York", "new york", True),
    ("Paris", "Lyon", False),
])
def test_answers_match(predicted, gold, same):
    assert answers_match(predicted, gold) is same


def test_exact_answer_reward_scores_a_batch():
    reward = ExactAnswerReward()
    batch = [s("so Answer: 12.0", answer=12), s("it is 7", answer="8"), s("nothing", answer="1"),
             s("Answer: 1,000", answer="1000")]
    assert reward.score(batch) == [1.0, 0.0, 0.0, 1.0]
    assert isinstance(reward, RewardSource)


def test_exact_answer_reward_takes_a_task_checker_extractor():
    boxed = re.compile(r"\\boxed\{([^}]*)\}")

    def extract_boxed(text):
        found = boxed.findall(text)
        return found[-1] if found else None

    reward = ExactAnswerReward(extract=extract_boxed)
    assert reward.score([s(r"so \boxed{42}. Answer: 41", answer=42),
                         s("Answer: 42", answer=42)]) == [1.0, 0.0]
    case_sensitive = ExactAnswerReward(match=lambda predicted, gold: predicted == gold)
    assert case_sensitive.score([s("Answer: ABC", answer="ABC"), s("Answer: abc", answer="ABC")]) == [1.0, 0.0]


def test_exact_answer_reward_names_the_missing_field():
    with pytest.raises(DataError, match=r"field 'answer': sample 1 \(task t-7\) has no meta"):
        ExactAnswerReward().score([s("Answer: 1", answer=1), s("Answer: 2", task_id="t-7")])


# --------------------------------------------------------------------------------------
# Format and length
# --------------------------------------------------------------------------------------

def test_format_reward_search_and_full_match():
    batch = [s("<think>x</think> Answer: 3"), s("Answer: 3"), s("<think>\n</think>\nAnswer: 3")]
    anywhere = FormatReward(r"Answer: \d+")
    assert anywhere.score(batch) == [1.0, 1.0, 1.0]
    whole = FormatReward(r"<think>.*</think>\s*Answer: \d+", full_match=True)
    assert whole.score(batch) == [1.0, 0.0, 0.0]       # "." does not span the newline
    whole_dotall = FormatReward(r"<think>.*</think>\s*Answer: \d+", full_match=True, flags=re.DOTALL)
    assert whole_dotall.score(batch) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="invalid regex"):
        FormatReward("(")


def words(n: int) -> Sample:
    return s(" ".join(["w"] * n))


def test_length_reward_shapes_by_hand():
    # target 10, tol = 10/2 = 5.  linear: 1 − d/5 ; gaussian: exp(−½(d/5)²) ; step: 1 iff d=0.
    lengths = [10, 7, 15, 20]                     # d = 0, 3, 5, 10
    batch = [words(n) for n in lengths]
    assert LengthReward(target_words=10).score(batch) == pytest.approx([1.0, 0.4, 0.0, 0.0])
    assert LengthReward(target_words=10, shape="gaussian").score(batch) == pytest.approx(
        [1.0, math.exp(-0.18), math.exp(-0.5), math.exp(-2.0)])
    assert LengthReward(target_words=10, shape="step").score(batch) == [1.0, 0.0, 0.0, 0.0]


def test_length_reward_range_and_tolerance():
    # [4, 8], tol 2: 3 words -> d=1 -> 0.5 ; 6 -> 1 ; 9 -> d=1 -> 0.5 ; 12 -> d=4 -> 0.
    reward = LengthReward(min_words=4, max_words=8, tolerance_words=2)
    assert reward.score([words(3), words(6), words(9), words(12)]) == pytest.approx([0.5, 1.0, 0.5, 0.0])
    # Only a maximum of 10: default tol = 5; 0 words is fine, 13 words -> 1 − 3/5 = 0.4.
    assert LengthReward(max_words=10).score([words(0), words(13)]) == pytest.approx([1.0, 0.4])


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give target_words"),
    ({"target_words": 5, "max_words": 9}, "not both"),
    ({"min_words": 9, "max_words": 5}, "min_words 9 > max_words 5"),
    ({"target_words": 5, "shape": "cosine"}, "unknown shape 'cosine'"),
    ({"target_words": 5, "tolerance_words": 0}, "tolerance_words must be > 0"),
])
def test_length_reward_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LengthReward(**kwargs)


# --------------------------------------------------------------------------------------
# Code extraction and test scoring (the sandbox itself is tested in test_sandbox.py)
# --------------------------------------------------------------------------------------

def test_extract_code_prefers_the_last_python_block():
    text = ("First try:\n```python\ndef f(): return 1\n```\nFixed:\n```py\ndef f(): return 2\n```\n"
            "Run it:\n```bash\npython f.py\n```")
    assert extract_code(text) == "def f(): return 2\n"
    assert extract_code("```\nx = 1\n```\n```text\nnot code\n```") == "x = 1\n"
    assert extract_code("def f():\n    return 3") == "def f():\n    return 3"


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def test_code_reward_correct_partial_and_all_or_nothing():
    correct = s("```python\ndef add(a, b):\n    return a + b\n```", tests=ADD_TESTS)
    # a*b passes only add(2, 2) == 4: 1 of 3 tests.
    partial = s("```python\ndef add(a, b):\n    return a * b\n```", tests=ADD_TESTS)
    broken = s("```python\ndef add(a, b) return\n```", tests=ADD_TESTS)     # syntax error
    batch = [correct, partial, broken]
    assert CodeExecutionReward(timeout_s=5).score(batch) == pytest.approx([1.0, 1 / 3, 0.0])
    assert CodeExecutionReward(all_or_nothing=True, timeout_s=5).score(batch) == [1.0, 0.0, 0.0]


def test_code_reward_keeps_tests_passed_before_a_hang_and_ignores_print_floods():
    # Test 0 passes, test 1 hangs until the timeout, test 2 never runs: 1/3.
    hangs = s("def f(x):\n    while x > 5:\n        pass\n    return x",
              tests=["assert f(1) == 1", "assert f(9) == 9", "assert f(2) == 2"])
    # A solution that prints ~1 MB before its (correct) answer still scores 1.
    chatty = s("print('x' * 1_000_000)\ndef g():\n    return 5", tests="assert g() == 5")
    outcomes = CodeExecutionReward(timeout_s=1).evaluate([hangs, chatty])
    assert (outcomes[0].passed, outcomes[0].total, outcomes[0].sandbox.timed_out) == (1, 3, True)
    assert (outcomes[1].passed, outcomes[1].total) == (1, 1)
    assert outcomes[1].sandbox.output_truncated


def test_code_reward_calls_test_functions_a_snippet_defines():
    snippet = "def test_small():\n    assert sq(2) == 4\n\ndef test_negative():\n    assert sq(-3) == 9\n"
    right = s("def sq(x):\n    return x * x", tests=[snippet])
    wrong = s("def sq(x):\n    return 2 * x", tests=[snippet])   # 2·2 = 4 but 2·(−3) ≠ 9
    assert CodeExecutionReward(timeout_s=5).score([right, wrong]) == [1.0, 0.0]


def test_code_reward_exit_and_forged_reports_do_not_pass():
    # Exiting the process before the tests run, or printing/writing a fake "pass" line
    # without the per-run token, passes nothing.
    early_exit = s("import os\nos._exit(0)", tests=["assert True"])
    forged = s("import os\nos.write(3, b'0 pass 0\\n')\nprint('pass 0')\nos._exit(0)",
               tests=["assert True"])
    assert CodeExecutionReward(timeout_s=5).score([early_exit, forged]) == [0.0, 0.0]


def test_code_reward_names_bad_tests_field():
    with pytest.raises(DataError, match=r"field 'tests': sample 0 has no meta\['tests'\]"):
        CodeExecutionReward().score([s("x = 1")])
    with pytest.raises(DataError, match="must be a non-empty list of code strings"):
        CodeExecutionReward().score([s("x = 1", tests=[])])
    with pytest.raises(DataError, match="field 'tests'"):
        CodeExecutionReward().score([s("x = 1", tests=[1, 2])])
