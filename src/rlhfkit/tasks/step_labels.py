"""Step labels for process supervision: which lines of a solution are right, decided exactly.

A solution is read as steps: its non-empty lines, in order (`split_steps`). A step is judged
against the task's truth, never against the solution's own claims:

- the answer line (one containing `Answer:`) is right iff the task's checker accepts it
  (`tasks.check.check` on that line alone);
- any other line is right iff
  1. every binary equation in it holds exactly: `a + b = c`, `a - b = c`, `a × b = c`
     (also `*`, `x`), `a ÷ b = c` (also `/`), compared as decimals;
  2. every conversion rule in it is the task's own: "A unit is B units" holds iff the
     task's reference states the same rule with B/A equal to its factor;
  3. every number in it is one of the task's truth numbers: those of the prompt and of the
     reference solution (operands, factors, results).
  A line with nothing to check (no number) is right.

Labels are prefix correctness: label_k = 1 iff steps 1..k are all right. A step after the
first wrong one is labelled wrong even if it is right on its own (a right answer reached
through a wrong step is not a right solution), so the labels of a solution are ones then
zeros, and its last label is 1 iff the whole solution is right.

The labels are exact for the `arithmetic` and `units` families (`STEP_FAMILIES`), whose steps
are equations and conversion rules; the other families' reasoning lines state relations
(greater than, the first letter) these checks do not read, so they are refused.

`make_step_records` writes the data a process reward model trains on: each task's reference
solution (all steps right) plus `corruptions` copies with one number of one step perturbed
(`corrupt_steps`), and — half of the time — the same number changed in every later step,
so the corrupted solution stays self-consistent after its first error. Every record is
labelled by `label_steps`, whatever the corruption meant to do.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import iter_records
from rlhfkit.io import atomic_write_text
from rlhfkit.models.process_reward import STEP_SEPARATOR
from rlhfkit.tasks.check import ANSWER_MARKER, check
from rlhfkit.tasks.generate import Task, make_tasks

STEP_FAMILIES: tuple[str, ...] = ("arithmetic", "units")

_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_NUMBER = re.compile(_NUM)
_EQUATION = re.compile(rf"({_NUM})\s*([-+×x*÷/])\s*({_NUM})\s*=\s*({_NUM})")
_RULE = re.compile(rf"({_NUM})\s+([a-z]+)\s+(?:is|are)\s+({_NUM})\s+([a-z]+)", re.IGNORECASE)


@dataclass(frozen=True)
class StepRecord:
    """One solution cut into steps with a 0/1 label per step (the JSONL record)."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]
    task_id: str = ""
    kind: str = "reference"  # reference | corrupted | model

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "steps": list(self.steps), "labels": list(self.labels),
                "task_id": self.task_id, "kind": self.kind}


def split_steps(response: str) -> list[tuple[str, int]]:
    """The steps of a response with where each ends: [(step text, end offset)], the text
    stripped and `response[end - len(text):end] == text`. Steps are the non-empty lines."""
    out, start = [], 0
    for line in response.split(STEP_SEPARATOR):
        text = line.strip()
        if text:
            end = start + len(line.rstrip())
            out.append((text, end))
        start += len(line) + len(STEP_SEPARATOR)
    return out


_IRREGULAR_UNITS = {"feet": "foot", "inches": "inch"}


def _unit(word: str) -> str:
    """A unit's singular: 'feet' → 'foot', 'minutes' → 'minute'."""
    word = word.lower()
    return _IRREGULAR_UNITS.get(word, word[:-1] if word.endswith("s") else word)


def _value(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


def _truth(task: Task) -> tuple[set[Decimal], dict[str, Decimal]]:
    """(the task's truth numbers, {unit: small units per one}) from its prompt and reference."""
    numbers = {_value(n) for n in _NUMBER.findall(task.prompt + " " + task.reference)}
    rules = {_unit(m.group(2)): _value(m.group(3)) / _value(m.group(1))
             for m in _RULE.finditer(task.reference) if _value(m.group(1)) != 0}
    return numbers, rules


def _equation_holds(a: Decimal, op: str, b: Decimal, c: Decimal) -> bool:
    if op == "+":
        return a + b == c
    if op == "-":
        return a - b == c
    if op in "×x*":
        return a * b == c
    return a == b * c  # ÷ and /: exact, no rounding


def step_is_right(task: Task, step: str) -> bool:
    """One step judged on its own against the task's truth (the rules of the module docstring)."""
    if ANSWER_MARKER.search(step):
        return check(task, step)
    numbers, rules = _truth(task)
    try:
        for m in _EQUATION.finditer(step):
            a, op, b, c = _value(m.group(1)), m.group(2), _value(m.group(3)), _value(m.group(4))
            if not _equation_holds(a, op, b, c):
                return False
        for m in _RULE.finditer(step):
            unit = _unit(m.group(2))
            if unit not in rules or _value(m.group(3)) != rules[unit] * _value(m.group(1)):
                return False
        return all(_value(n) in numbers for n in _NUMBER.findall(step))
    except InvalidOperation:
        return False


def label_steps(task: Task, steps: Sequence[str]) -> list[int]:
    """Prefix-correctness labels: label_k = 1 iff steps 1..k are all right (see the module)."""
    if task.family not in STEP_FAMILIES:
        raise ValueError(f"step labels are exact only for {STEP_FAMILIES}, not '{task.family}' (task {task.id})")
    labels, ok = [], True
    for step in steps:
        ok = ok and step_is_right(task, step)
        labels.append(int(ok))
    return labels


def label_response(task: Task, response: str) -> StepRecord:
    """A (model-written) response as a labelled `StepRecord`."""
    steps = tuple(text for text, _ in split_steps(response))
    return StepRecord(task.prompt, steps, tuple(label_steps(task, steps)), task.id, "model")


def corrupt_steps(steps: Sequence[str], rng: random.Random) -> list[str] | None:
    """One number of one step changed by a nonzero amount in [−10, 10] (staying ≥ 0); with
    probability ½ the same number is also changed in every later step. None when no step has
    a number. The change is drawn from `rng` only."""
    with_numbers = [k for k, s in enumerate(steps) if _NUMBER.search(s)]
    if not with_numbers:
        return None
    k = rng.choice(with_numbers)
    match = rng.choice(list(_NUMBER.finditer(steps[k])))
    old = int(_value(match.group()))
    new = old + rng.choice([d for d in range(-10, 11) if d != 0 and old + d >= 0])
    propagate = rng.random() < 0.5
    out = list(steps)
    out[k] = steps[k][:match.start()] + str(new) + steps[k][match.end():]
    if propagate:
        pattern = re.compile(rf"(?<![\d,.]){re.escape(match.group())}(?![\d,]|\.\d)")
        for j in range(k + 1, len(out)):
            out[j] = pattern.sub(str(new), out[j])
    return out


def step_records(tasks: Iterable[Task], *, corruptions: int, seed: int) -> list[StepRecord]:
    """Each task's reference solution plus `corruptions` corrupted copies, all labelled."""
    records = []
    for task in tasks:
        rng = random.Random(f"rlhfkit-prm/{task.id}/{seed}")
        steps = [text for text, _ in split_steps(task.reference)]
        records.append(StepRecord(task.prompt, tuple(steps), tuple(label_steps(task, steps)), task.id))
        for _ in range(corruptions):
            changed = corrupt_steps(steps, rng)
            if changed is not None:
                records.append(StepRecord(task.prompt, tuple(changed), tuple(label_steps(task, changed)),
                                          task.id, "corrupted"))
    return records


def make_step_records(split: str, n_per_family: int, *, corruptions: int = 2, seed: int = 0,
                      families: Sequence[str] = STEP_FAMILIES) -> list[StepRecord]:
    """Step-labelled solutions of the demo tasks of `split` (the tasks' fixed split)."""
    unknown = [f for f in families if f not in STEP_FAMILIES]
    if unknown:
        raise ValueError(f"step labels are exact only for {STEP_FAMILIES}; not {unknown}")
    if corruptions < 0:
        raise ValueError(f"corruptions must be ≥ 0, got {corruptions}")
    return step_records(make_tasks(split, n_per_family, seed=seed, families=families), corruptions=corruptions,
                        seed=seed)


def write_step_records(records: Iterable[StepRecord], path: str | Path) -> int:
    rows = [json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records]
    atomic_write_text(path, "".join(rows))
    return len(rows)


def read_step_records(path: str | Path) -> list[StepRecord]:
    """Records with `prompt` (a string), `steps` (non-empty strings) and `labels` (0/1, one
    per step); a bad record raises DataError naming the file, line and field."""
    out = []
    for rec, where in iter_records(path):
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise where.error("prompt", "missing or not a non-empty string")
        steps, labels = rec.get("steps"), rec.get("labels")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
            raise where.error("steps", "must be a non-empty list of non-empty strings")
        if any(STEP_SEPARATOR in s for s in steps):
            raise where.error("steps", "a step may not contain a line break (steps are lines)")
        if not isinstance(labels, list) or any(type(v) is not int or v not in (0, 1) for v in labels):
            raise where.error("labels", "must be a list of 0/1 integers")
        if len(labels) != len(steps):
            raise where.error("labels", f"{len(labels)} labels for {len(steps)} steps")
        out.append(StepRecord(rec["prompt"], tuple(s.strip() for s in steps), tuple(int(v) for v in labels),
                              str(rec.get("task_id", "")), str(rec.get("kind", ""))))
    if not out:
        raise DataError("no records", path=str(path))
    return out
