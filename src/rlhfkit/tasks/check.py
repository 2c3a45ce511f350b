"""Reading the final answer out of a response, and the exact checkers of the tasks.

`extract_final_answer` is the one answer extractor: the reward verifiers
(`rollout.verifiers.ExactAnswerReward`) use it as is, and the task checkers (`check`,
`gold_reward`) with a per-family fallback for responses that have no `Answer:` line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, localcontext

from rlhfkit.tasks.generate import Task

ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
# A number: thousands-separated ("1,000.5") or plain ("1000", "12.", ".5", "-3").
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)")
# Wrapping that models put around a final answer and that never changes it.
WRAPPING = " \t\n*`$"


def last_number(text: str) -> str | None:
    """The last `NUMBER` in `text`, as written; None when there is none."""
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_final_answer(text: str, *, fallback: Callable[[str], str | None] = last_number,
                         wrapping: str | None = WRAPPING) -> str | None:
    """The final answer in a response: the first line after the last "Answer:" (any case),
    `wrapping` stripped from both its ends (and from the text before it); None when that
    leaves nothing. A response without "Answer:" gives `fallback(text)`, by default the last
    number anywhere.

    wrapping=None strips whitespace only: the task checkers normalize the wrapping they accept
    themselves (a `$` stays part of their answer, so "$12$" is not 12 for them).
    """
    markers = list(ANSWER_MARKER.finditer(text))
    if markers:
        rest = text[markers[-1].end():].strip(wrapping)
        line = rest.splitlines()[0] if rest else ""
        return line.strip(wrapping) or None
    return fallback(text)


# ---- the task checkers -----------------------------------------------------------------------

# The task checkers' number: no leading '+' or '.', no trailing '.'. It differs from NUMBER on
# purpose: every task answer is a whole number, and the checkers' scores (the demo's gold
# accuracies and rewards) must not move, so ".5" still reads as 5 and "4., 7." as 4, 7 here.
_TASK_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_CHOICES = ({"yes", "no"}, {"true", "false"})


def _answer_kind(task: Task) -> str:
    """How a family's answers compare: numeric, choice, number_list, casefold or exact text."""
    answer = task.answer or ""
    if task.family in ("arithmetic", "units") or answer.isdigit():
        return "numeric"
    if task.family == "format" and any(answer in c for c in _CHOICES):
        return "choice"
    if re.fullmatch(r"\d+(, \d+)+", answer):
        return "number_list"
    # strings: letters and joined words ignore case, but "uppercase" answers must match exactly;
    # format: a rewrite into lowercase is the whole point, so case counts.
    if task.family == "strings" and answer == answer.lower():
        return "casefold"
    return "exact"


def _normalize_number(text: str) -> str:
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")  # thousands separators only: "1,2" stays, and stays wrong
    if not re.fullmatch(r"[+-]?\d+(\.\d+)?", text):
        return text  # not a plain number ("twelve", "12 apples", "1e3"): kept, so never equals "12"
    with localcontext() as ctx:
        ctx.prec = len(text) + 2  # exact for any digit count (the default 28 raised on longer numbers)
        value = Decimal(text)
        integral = value == value.to_integral_value()
        return str(value.quantize(Decimal(1)) if integral else value.normalize())


def _normalize(kind: str, text: str) -> str:
    text = " ".join(text.split()).strip("*_`\"' ").rstrip(".!?;:, ").strip("*_`\"' ")
    if kind == "numeric":
        return _normalize_number(text)
    if kind == "number_list":
        return ", ".join(_normalize_number(item.strip()) for item in text.split(","))
    return text.casefold() if kind in ("choice", "casefold") else text


def _fallback(kind: str, task: Task, response: str) -> str | None:
    if kind == "numeric":
        numbers = _TASK_NUMBER.findall(response)
        return numbers[-1] if numbers else None
    if kind == "choice":
        choices = next(c for c in _CHOICES if task.answer in c)
        words = [w for w in re.findall(r"[a-z]+", response.casefold()) if w in choices]
        return words[-1] if words else None
    if kind in ("casefold", "exact") and " " not in (task.answer or ""):
        words = re.findall(r"[A-Za-z]+", response)
        return words[-1] if words else None
    lines = [line for line in response.splitlines() if line.strip()]
    if kind == "number_list":
        lines = [", ".join(_TASK_NUMBER.findall(line)) for line in lines if _TASK_NUMBER.search(line)]
    return lines[-1] if lines else None


def extract_answer(task: Task, response: str) -> str | None:
    """The normalized answer a response gives, or None if it gives none (always for open tasks).

    1. If the response has an `Answer:` line (any case), the value is the first non-empty text
       after the *last* `Answer:`; nothing else in the response is looked at, so a numeric value
       must be just a number ("Answer: twelve" and "Answer: 12 apples" are wrong).
    2. Otherwise a family-appropriate fallback:
       numeric answers (arithmetic, units, letter counts, "which is larger"): the last number;
       yes/no and true/false: the last of those words; single-word text answers (letters,
       uppercase, joined words): the last run of letters; sorted lists: the numbers on the last
       line that has any, in order; lowercase rewrites: the last non-empty line.
    Normalization: whitespace collapsed, wrapping quotes/asterisks/backticks and trailing
    .!?;:, removed; numbers lose thousands commas and compare by value ("12.0" == "12");
    yes/no, true/false and strings-family lowercase answers ignore case; uppercase and
    lowercase rewrites must match case exactly.
    """
    if task.answer is None:
        return None
    kind = _answer_kind(task)
    raw = extract_final_answer(response, fallback=lambda text: _fallback(kind, task, text), wrapping=None)
    return None if raw is None else _normalize(kind, raw)


def check(task: Task, response: str) -> bool:
    """Exact match of the extracted answer with the canonical one; False for open tasks."""
    if task.answer is None:
        return False
    return extract_answer(task, response) == _normalize(_answer_kind(task), task.answer)


def gold_reward(task: Task, response: str) -> float:
    """1.0 if `check` passes, else 0.0. Open-ended tasks have no gold answer: ValueError."""
    if not task.checkable:
        raise ValueError(f"task {task.id} ({task.family}) is open-ended and has no gold reward")
    return 1.0 if check(task, response) else 0.0
