"""Step labels of the demo tasks, by hand."""

import json

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.tasks.generate import Task
from rlhfkit.tasks.step_labels import (
    corrupt_steps,
    label_response,
    label_steps,
    make_step_records,
    read_step_records,
    split_steps,
    write_step_records,
)

ADD = Task("arithmetic-train-0000", "arithmetic",
           "Tom has 7 apples and buys 5 more. How many apples does Tom have now?", "12", "7 + 5 = 12.\nAnswer: 12")
KM = Task("units-train-0000", "units", "How many meters are in 3 kilometers?", "3000",
          "1 kilometer is 1000 meters, so 3 × 1000 = 3000.\nAnswer: 3000")
HOURS = Task("units-train-0001", "units", "How many hours are in 120 minutes?", "2",
             "1 hour is 60 minutes, so 120 ÷ 60 = 2.\nAnswer: 2")


def test_steps_are_the_non_empty_lines_with_their_end_offsets():
    text = "7 + 5 = 12.\n\n  Answer: 12  "
    assert split_steps(text) == [("7 + 5 = 12.", 11), ("Answer: 12", 25)]
    assert text[25 - len("Answer: 12"):25] == "Answer: 12"


@pytest.mark.parametrize("steps, labels", [
    (["7 + 5 = 12.", "Answer: 12"], [1, 1]),
    (["5 + 7 = 12.", "Answer: 12"], [1, 1]),                     # the same sum, operands swapped
    (["7 + 5 = 13.", "Answer: 13"], [0, 0]),                     # wrong sum carried to the answer
    (["7 + 5 = 13.", "Answer: 12"], [0, 0]),                     # prefix rule: right answer after a wrong step
    (["7 + 5 = 12.", "Answer: 13"], [1, 0]),                     # right step, wrong answer
    (["7 + 6 = 13.", "Answer: 13"], [0, 0]),                     # a true equation, but 6 is not the task's
    (["Let me add them.", "7 + 5 = 12.", "Answer: 12"], [1, 1, 1]),  # nothing to check: right
])
def test_arithmetic_steps_by_hand(steps, labels):
    assert label_steps(ADD, steps) == labels


@pytest.mark.parametrize("task, steps, labels", [
    (KM, ["1 kilometer is 1000 meters, so 3 × 1000 = 3000.", "Answer: 3000"], [1, 1]),
    (KM, ["1 kilometer is 100 meters, so 3 × 100 = 300.", "Answer: 300"], [0, 0]),      # wrong factor
    (KM, ["2 kilometer is 1000 meters, so 3 × 1000 = 3000.", "Answer: 3000"], [0, 0]),  # 1000 ≠ 2 × 1000
    (KM, ["3 kilometers are 3000 meters.", "Answer: 3000"], [1, 1]),                   # the rule, scaled
    (HOURS, ["1 hour is 60 minutes, so 120 / 60 = 2.", "Answer: 2"], [1, 1]),
    (HOURS, ["1 hour is 60 minutes, so 120 ÷ 60 = 3.", "Answer: 3"], [0, 0]),
])
def test_units_steps_by_hand(task, steps, labels):
    assert label_steps(task, steps) == labels


def test_a_model_response_is_labelled_line_by_line():
    record = label_response(ADD, "7 + 5 = 12.\nSo Tom has 12 apples.\nAnswer: 12")
    assert record.steps == ("7 + 5 = 12.", "So Tom has 12 apples.", "Answer: 12") and record.labels == (1, 1, 1)
    assert record.kind == "model"


def test_families_without_exact_step_labels_are_refused():
    with pytest.raises(ValueError, match="exact only"):
        label_steps(Task("strings-train-0000", "strings", "q", "a", "r\nAnswer: a"), ["Answer: a"])


class ScriptedRng:
    """choice() returns the scripted index of each list it is given; random() the scripted value."""

    def __init__(self, picks, value):
        self.picks, self.value = list(picks), value

    def choice(self, seq):
        return list(seq)[self.picks.pop(0)]

    def random(self):
        return self.value


def test_corruption_changes_one_number_and_may_carry_it():
    steps = ["7 + 5 = 12.", "Answer: 12"]
    # step 0, its third number (12), delta index 10 of [-10..-1, 1..10] = +1
    assert corrupt_steps(steps, ScriptedRng([0, 2, 10], 0.2)) == ["7 + 5 = 13.", "Answer: 13"]  # carried
    assert corrupt_steps(steps, ScriptedRng([0, 2, 10], 0.9)) == ["7 + 5 = 13.", "Answer: 12"]
    # step 1's number (12), delta −10 → 2
    assert corrupt_steps(steps, ScriptedRng([1, 0, 0], 0.9)) == ["7 + 5 = 12.", "Answer: 2"]
    assert corrupt_steps(["No numbers here."], ScriptedRng([], 0.0)) is None


def test_generated_records_are_balanced_and_every_corruption_is_caught():
    records = make_step_records("train", 30, corruptions=2, seed=0)
    references = [r for r in records if r.kind == "reference"]
    corrupted = [r for r in records if r.kind == "corrupted"]
    assert len(references) == 60 and len(corrupted) == 120
    assert all(set(r.labels) == {1} for r in references)
    assert all(min(r.labels) == 0 for r in corrupted)
    assert all(list(r.labels) == sorted(r.labels, reverse=True) for r in records)  # ones, then zeros
    test = make_step_records("test", 30, corruptions=2, seed=0)
    assert not {r.prompt for r in test} & {r.prompt for r in records}


def test_records_round_trip_and_bad_lines_name_file_line_field(tmp_path):
    records = make_step_records("train", 2, corruptions=1)
    path = tmp_path / "steps.jsonl"
    assert write_step_records(records, path) == len(records)
    assert read_step_records(path) == [r.__class__(r.prompt, r.steps, r.labels, r.task_id, r.kind) for r in records]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "steps": ["a", "b"], "labels": [1, 0]}) + "\n"
                   + json.dumps({"prompt": "p", "steps": ["a", "b"], "labels": [1]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'labels': 1 labels for 2 steps"):
        read_step_records(bad)
    bad.write_text(json.dumps({"prompt": "p", "steps": ["a"], "labels": [0.5]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'labels'"):
        read_step_records(bad)
