"""Rule-based reward sources: exact answers, formats, lengths, and code run against tests.

Each class follows `rlhfkit.rollout.rewards.RewardSource`: a `name` and
`score(samples) -> list[float]`. What a sample must carry in `meta`:

| source | meta key | value |
|---|---|---|
| ExactAnswerReward | "answer" | the gold answer (str or number) |
| CodeExecutionReward | "tests" | a list of test snippets (each often one `assert`), or one |
| FormatReward, LengthReward | — | — |
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rlhfkit.data.errors import DataError
from rlhfkit.rollout.rewards import Sample
from rlhfkit.rollout.sandbox import SandboxResult, run_python
from rlhfkit.tasks.check import NUMBER, WRAPPING, extract_final_answer


def _gold(sample: Sample, index: int, key: str) -> Any:
    if key not in sample.meta:
        task = sample.meta.get("task_id", sample.meta.get("id"))
        where = f"sample {index}" + (f" (task {task})" if task is not None else "")
        raise DataError(f"{where} has no meta[{key!r}] to check against", field=key)
    return sample.meta[key]


# --------------------------------------------------------------------------------------
# Exact answers
# --------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SIMPLE_FRACTION = re.compile(r"[-+]?\d+\s*/\s*\d+")


def _as_number(text: str) -> Fraction | None:
    """An exact value for "12", "12.0", "1,000", "-0.5", "3/4"; None if not a number."""
    text = text.strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    elif not (NUMBER.fullmatch(text) or _SIMPLE_FRACTION.fullmatch(text)):
        return None
    try:
        return Fraction(text.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def normalize_answer(text: str) -> str:
    """Strip wrapping (`*`, `` ` ``, `$`, spaces) and a trailing period; collapse spaces;
    casefold."""
    text = text.strip(WRAPPING)
    if text.endswith("."):
        text = text[:-1].rstrip(WRAPPING)
    return " ".join(text.split()).casefold()


def answers_match(predicted: str, gold: str) -> bool:
    """Equal as exact numbers when both are numbers ("12.0" == "12", "1,000" == "1000",
    "0.5" == "1/2"), else equal after `normalize_answer`."""
    predicted, gold = normalize_answer(predicted), normalize_answer(gold)
    p, g = _as_number(predicted), _as_number(gold)
    if p is not None and g is not None:
        return p == g
    return predicted == gold


class ExactAnswerReward:
    """1.0 when the answer extracted from the response matches meta["answer"], else 0.0.

    `extract` pulls the final answer out of a response (None: no answer, scored 0);
    `match(predicted, gold)` compares it with the gold answer. A checker that needs more than
    the response (e.g. the demo tasks' `check(task, response)`) plugs in through
    `rlhfkit.rollout.rewards.FunctionReward` instead.
    """

    def __init__(self, extract: Callable[[str], str | None] = extract_final_answer, *,
                 match: Callable[[str, str], bool] = answers_match, answer_key: str = "answer",
                 name: str = "exact_answer") -> None:
        self.extract = extract
        self.match = match
        self.answer_key = answer_key
        self.name = name

    def score(self, samples: Sequence[Sample]) -> list[float]:
        scores = []
        for i, sample in enumerate(samples):
            gold = _gold(sample, i, self.answer_key)
            predicted = self.extract(sample.response)
            scores.append(float(predicted is not None and self.match(predicted, str(gold))))
        return scores


# --------------------------------------------------------------------------------------
# Format and length
# --------------------------------------------------------------------------------------

class FormatReward:
    """1.0 when the response matches `pattern`, else 0.0.

    full_match: the whole response must match (`re.fullmatch`); otherwise a match anywhere
    (`re.search`) counts. Pass `flags` (e.g. re.DOTALL so `.` spans lines).
    """

    def __init__(self, pattern: str | re.Pattern, *, full_match: bool = False, flags: int = 0,
                 name: str = "format") -> None:
        try:
            self.pattern = (pattern if isinstance(pattern, re.Pattern)
                            else re.compile(pattern, flags))
        except re.error as exc:
            raise ValueError(f"FormatReward: invalid regex {pattern!r}: {exc}") from None
        self.full_match = full_match
        self.name = name

    def score(self, samples: Sequence[Sample]) -> list[float]:
        match = self.pattern.fullmatch if self.full_match else self.pattern.search
        return [float(match(s.response) is not None) for s in samples]


def _step(distance: float, tolerance: float) -> float:
    return 1.0 if distance == 0 else 0.0


def _linear(distance: float, tolerance: float) -> float:
    return max(0.0, 1.0 - distance / tolerance)


def _gaussian(distance: float, tolerance: float) -> float:
    return math.exp(-0.5 * (distance / tolerance) ** 2)


# shape name -> reward as a function of (distance outside the allowed range, tolerance)
LENGTH_SHAPES: dict[str, Callable[[float, float], float]] = {
    "step": _step,         # 1 inside the range, 0 outside
    "linear": _linear,     # 1 − d/tol, floored at 0
    "gaussian": _gaussian,  # exp(−½ (d/tol)²)
}


class LengthReward:
    """A reward in [0, 1] for response length in words (whitespace-separated).

    Give `target_words`, or `min_words` and/or `max_words`. d is how many words the response
    lies outside [min, max] (outside the single point `target`), 0 inside; the reward is
    `LENGTH_SHAPES[shape](d, tol)`. `tolerance_words` (tol) defaults to half the bound that
    was crossed (half the target), at least 1 word.
    """

    def __init__(self, *, target_words: int | None = None, min_words: int | None = None,
                 max_words: int | None = None, shape: str = "linear",
                 tolerance_words: float | None = None, name: str = "length") -> None:
        if target_words is not None and (min_words is not None or max_words is not None):
            raise ValueError("LengthReward: give target_words or min_words/max_words, not both")
        if target_words is not None:
            min_words = max_words = target_words
        if min_words is None and max_words is None:
            raise ValueError("LengthReward: give target_words, min_words or max_words")
        for label, v in (("min_words", min_words), ("max_words", max_words)):
            if v is not None and v < 0:
                raise ValueError(f"LengthReward: {label} must be >= 0, got {v}")
        if min_words is not None and max_words is not None and min_words > max_words:
            raise ValueError(f"LengthReward: min_words {min_words} > max_words {max_words}")
        if shape not in LENGTH_SHAPES:
            raise ValueError(f"LengthReward: unknown shape {shape!r}; "
                             f"choose from {sorted(LENGTH_SHAPES)}")
        if tolerance_words is not None and tolerance_words <= 0:
            raise ValueError(f"LengthReward: tolerance_words must be > 0, got {tolerance_words}")
        self.min_words = min_words
        self.max_words = max_words
        self.shape = shape
        self.tolerance_words = tolerance_words
        self.name = name

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [self._reward(len(s.response.split())) for s in samples]

    def _reward(self, words: int) -> float:
        if self.min_words is not None and words < self.min_words:
            distance, bound = self.min_words - words, self.min_words
        elif self.max_words is not None and words > self.max_words:
            distance, bound = words - self.max_words, self.max_words
        else:
            return 1.0
        tolerance = self.tolerance_words or max(1.0, bound / 2)
        return LENGTH_SHAPES[self.shape](distance, tolerance)


# --------------------------------------------------------------------------------------
# Code execution against tests
# --------------------------------------------------------------------------------------

_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


def extract_code(response: str) -> str:
    """The last ```python block; else the last untagged ``` block; else the whole response.

    The last one because a response that revises its code ends with the final version.
    """
    blocks = [(tag.strip().lower(), body) for tag, body in _FENCE.findall(response)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == ""):
        chosen = [body for tag, body in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return response


# Runs the solution, then each test in the solution's namespace, reporting every test's
# outcome to fd 3 with a per-run token as soon as it is known: a later test that hangs or
# kills the process does not erase the earlier ones, and the solution's own prints cannot
# push the results out of truncated stdout. The solution runs as module "solution", so
# its `if __name__ == "__main__":` demo code does not run. Catching BaseException means a
# stray `sys.exit()` fails one test (or ends the solution's own run), not the whole harness.
_HARNESS_BODY = '''
import linecache as _linecache
import os as _os
import traceback as _traceback

def _compile(source, filename):
    # Keep the source so tracebacks show the failing line.
    _linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return compile(source, filename, "exec")

def _report(status, index):
    _os.write(3, ("%s %s %d\\n" % (_TOKEN, status, index)).encode())

_namespace = {"__name__": "solution"}
try:
    exec(_compile(_SOLUTION, "solution.py"), _namespace)
except BaseException:
    _traceback.print_exc()
for _index, _test in enumerate(_TESTS):
    try:
        _before = set(_namespace)
        exec(_compile(_test, "test_%d.py" % _index), _namespace)
        # A snippet that defines test functions (pytest style) passes only if they do.
        for _name in [n for n in _namespace if n not in _before and n.startswith("test")]:
            if callable(_namespace[_name]):
                _namespace[_name]()
    except BaseException:
        _traceback.print_exc()
        _report("fail", _index)
    else:
        _report("pass", _index)
'''


def _harness(solution: str, tests: Sequence[str], token: str) -> str:
    return (f"_SOLUTION = {solution!r}\n_TESTS = {list(tests)!r}\n_TOKEN = {token!r}\n"
            + _HARNESS_BODY)


@dataclass(frozen=True)
class CodeTestOutcome:
    """How one response did against its tests."""

    passed: int              # tests that ran to the end without an exception
    total: int               # tests given
    sandbox: SandboxResult   # the run itself (stdout/stderr, timeout, limits that held)


class CodeExecutionReward:
    """Fraction of meta["tests"] the response's code passes, run in the sandbox.

    The code is `extract_code(response)` (or your `extract_code`). meta["tests"] is a list of
    snippets, each one test (typically one `assert`), run in turn in the solution's
    namespace; a single string is one test. A snippet passes when it runs without an
    exception, including any `test*` functions it defines (they are called).
    Score: passed / total, or with `all_or_nothing` 1.0 only when every test passes. A
    timeout, a crash or an exceeded limit fails the tests not yet reported. A sandbox that
    cannot be set up raises `SandboxSetupError` instead of scoring 0.

    Known limit: the harness shares a process with the solution, so a solution written to
    cheat it (e.g. returning an object whose `__eq__` is always True, or finding the report
    token in memory) can pass tests it should fail.
    """

    def __init__(self, *, all_or_nothing: bool = False, timeout_s: float = 5.0,
                 memory_mb: int = 256, max_workers: int = 2,
                 extract_code: Callable[[str], str] = extract_code, tests_key: str = "tests",
                 name: str = "code_tests") -> None:
        if max_workers < 1:
            raise ValueError(f"CodeExecutionReward: max_workers must be >= 1, got {max_workers}")
        self.all_or_nothing = all_or_nothing
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_workers = max_workers
        self.extract_code = extract_code
        self.tests_key = tests_key
        self.name = name

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [self._score(o) for o in self.evaluate(samples)]

    def evaluate(self, samples: Sequence[Sample]) -> list[CodeTestOutcome]:
        """Run every sample's code against its tests (in parallel, `max_workers` at a time)."""
        tests = [self._tests(sample, i) for i, sample in enumerate(samples)]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(self._run, samples, tests))

    def _score(self, outcome: CodeTestOutcome) -> float:
        if self.all_or_nothing:
            return float(outcome.passed == outcome.total)
        return outcome.passed / outcome.total

    def _tests(self, sample: Sample, index: int) -> list[str]:
        tests = _gold(sample, index, self.tests_key)
        if isinstance(tests, str):
            tests = [tests]
        if (not isinstance(tests, (list, tuple)) or not tests
                or not all(isinstance(t, str) for t in tests)):
            raise DataError(f"sample {index}: meta[{self.tests_key!r}] must be a non-empty list "
                            f"of code strings or one code string, got {tests!r:.200}",
                            field=self.tests_key)
        return list(tests)

    def _run(self, sample: Sample, tests: list[str]) -> CodeTestOutcome:
        token = secrets.token_hex(16)
        result = run_python(_harness(self.extract_code(sample.response), tests, token),
                            timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        outcomes: dict[int, str] = {}
        for line in result.report.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == token and parts[2].isdigit():
                outcomes.setdefault(int(parts[2]), parts[1])  # the first word on a test stands
        passed = sum(1 for i in range(len(tests)) if outcomes.get(i) == "pass")
        return CodeTestOutcome(passed=passed, total=len(tests), sandbox=result)
