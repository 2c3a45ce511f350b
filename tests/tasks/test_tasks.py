"""Checkable tasks: deterministic, disjoint splits, and checkers that are exact and fair."""

import json
import re

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.tasks.check import check, extract_answer, extract_final_answer, gold_reward
from rlhfkit.tasks.generate import FAMILIES, Task, make_tasks
from rlhfkit.tasks.records import load_task_records, read_jsonl, to_sft_record, write_jsonl

CHECKABLE = tuple(f for f in FAMILIES if f != "open")


def _task(family: str, answer: str | None) -> Task:
    return Task(f"{family}-test-9999", family, "a prompt", answer, "a reference")


def test_same_arguments_give_the_same_tasks_and_a_new_seed_new_ones():
    assert make_tasks("train", 30, seed=3) == make_tasks("train", 30, seed=3)
    assert make_tasks("train", 30, seed=3) != make_tasks("train", 30, seed=4)


def test_ids_are_unique_and_families_interleave():
    tasks = make_tasks("test", 40)
    assert len({t.id for t in tasks}) == len(tasks) == 40 * len(FAMILIES)
    assert [t.family for t in tasks[:5]] == list(FAMILIES)
    assert tasks[5].id == "arithmetic-test-0001"


def test_smaller_test_sets_are_prefixes_of_larger_ones():
    full = make_tasks("test", 120)
    assert make_tasks("test", 7) == full[:7 * len(FAMILIES)]
    assert make_tasks("test", 0) == []
    only = make_tasks("test", 9, families=("units", "open"))
    assert only == [t for t in make_tasks("test", 20) if t.family in ("units", "open")][:18]


@pytest.mark.parametrize("train_seed,test_seed", [(0, 0), (1, 0), (0, 5)])
def test_train_and_test_share_no_prompt_and_no_problem(train_seed, test_seed):
    train = make_tasks("train", 600, seed=train_seed)
    test = make_tasks("test", 200, seed=test_seed)
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    # For checkable families the reference is a function of the problem alone (not of its
    # wording), so equal references would mean a paraphrase of a test problem leaked into train.
    assert not {t.reference for t in train if t.checkable} & {t.reference for t in test if t.checkable}


def _fact(task: Task):
    """What a task really asks, whatever the order it is asked in: {7, 5} under "+" for 5 + 7."""
    reasoning = task.reference.split("\n")[0]
    if sum_or_product := re.match(r"(\d+) ([+×]) (\d+) =", reasoning):
        return sum_or_product[2], frozenset((sum_or_product[1], sum_or_product[3]))
    if comparison := re.match(r"(\d+) is (?:greater|less|larger|smaller) than (\d+)\.", reasoning):
        return "compare", frozenset(comparison.groups())
    return reasoning, task.answer


def test_a_fact_asked_in_another_order_stays_on_its_own_side_of_the_split():
    families = ("arithmetic", "format")
    train = {_fact(t) for t in make_tasks("train", 1500, families=families)}
    test = {_fact(t) for t in make_tasks("test", 300, families=families)}
    assert not train & test


def test_no_problem_repeats_within_a_split():
    tasks = make_tasks("train", 400)
    assert len({t.prompt for t in tasks}) == len(tasks)
    assert len({t.reference for t in tasks if t.checkable}) == sum(t.checkable for t in tasks)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_worded_several_ways(family):
    openings = {" ".join(t.prompt.split()[:2]) for t in make_tasks("train", 200, families=(family,))}
    assert len(openings) >= 3


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_reference_passes_its_checker(split):
    for task in make_tasks(split, 200):
        if task.checkable:
            reasoning, answer_line = task.reference.split("\n")
            assert reasoning.endswith(".") and answer_line == f"Answer: {task.answer}", task
            assert check(task, task.reference) and gold_reward(task, task.reference) == 1.0, task
        else:
            assert task.family == "open" and task.answer is None and len(task.reference) > 20


def _wrong(task: Task) -> str:
    flips = {"yes": "no", "no": "yes", "true": "false", "false": "true"}
    if task.answer in flips:
        return flips[task.answer]
    if task.answer.isdigit():
        return str(int(task.answer) + 1)
    return task.answer + "s"


def test_a_wrong_answer_is_rejected_for_every_checkable_task():
    for task in make_tasks("test", 60, families=CHECKABLE):
        response = f"{task.reference.split(chr(10))[0]}\nAnswer: {_wrong(task)}"
        assert not check(task, response) and gold_reward(task, response) == 0.0, task


@pytest.mark.parametrize("family,answer,response,correct", [
    # numbers: the last "Answer:" wins; "." and thousands commas and ".0" are forgiven
    ("arithmetic", "12", "7 + 5 = 12.\nAnswer: 12.", True),
    ("arithmetic", "12", "answer: **12**", True),
    ("arithmetic", "12", "Answer: 12.0", True),
    ("arithmetic", "12", "Answer: 10\nOops.\nAnswer: 12", True),
    ("units", "7000", "Answer: 7,000", True),
    ("arithmetic", "12", "Answer: 1,2", False),  # not a thousands separator
    ("arithmetic", "12", "7 + 5 = 12.\nAnswer: twelve", False),  # the Answer line rules, not the 12 above
    ("arithmetic", "12", "Answer: 12 apples", False),
    ("arithmetic", "12", "Answer: 12.5", False),
    ("arithmetic", "12", "The sum is 12.\nAnswer:", False),
    # numbers without an Answer line: the last number in the text
    ("arithmetic", "12", "First 10, then two more makes 12 apples.", True),
    ("arithmetic", "12", "7 + 5 = 12, and 12 + 1 = 13", False),
    ("units", "1500", "That is 1,500 meters.", True),
    ("arithmetic", "12", "I do not know.", False),
    # numbers longer than Decimal's default 28-digit precision: scored, not raised (a sampled
    # response with 40 digits once stopped an RL run)
    ("arithmetic", "12", "Answer: " + "1" * 40, False),
    ("arithmetic", "1" * 40, "Answer: " + "1" * 40 + ".0", True),
    ("arithmetic", "12", "Answer: 12." + "0" * 40, True),
    # strings: letters ignore case, the uppercase transform does not
    ("strings", "g", "Answer: G", True),
    ("strings", "g", "The word starts with 'g'.", True),  # fallback: last run of letters
    ("strings", "GARDEN", "Answer: garden", False),
    ("strings", "GARDEN", "Answer: GARDEN", True),
    ("strings", "GARDEN", "In capitals that is GARDEN.", True),
    ("strings", "sunflower", "Answer: SunFlower", True),
    ("strings", "6", "g-a-r-d-e-n has 6 letters.", True),
    ("strings", "6", "Answer: six", False),
    # format: yes/no and true/false ignore case; lowercase rewrites and lists are exact in form
    ("format", "yes", "Answer: Yes.", True),
    ("format", "yes", "Answer: yes, because 9 > 4", False),
    ("format", "no", "Yes, hmm. Actually no.", True),  # fallback: last yes/no word
    ("format", "false", "That is TRUE.", False),
    ("format", "green apple", "Answer: green apple", True),
    ("format", "green apple", "Answer: Green Apple", False),
    ("format", "green apple", "Sure!\ngreen apple", True),  # fallback: last non-empty line
    ("format", "4, 7, 9", "Answer: 4,7,9", True),
    ("format", "4, 7, 9", "Answer: 9, 7, 4", False),
    ("format", "4, 7, 9", "In order: 4, 7, 9.", True),  # fallback: numbers on the last line with any
    ("format", "4, 7, 9", "4, 7, 9\nfrom 9, 7, 4", False),
    ("format", "23", "Answer: 23", True),
])
def test_extraction_and_normalization(family, answer, response, correct):
    assert check(_task(family, answer), response) is correct


def test_extract_answer_returns_the_normalized_value_or_none():
    assert extract_answer(_task("units", "7000"), "Answer: 7,000.") == "7000"
    assert extract_answer(_task("strings", "g"), "Answer: 'G'") == "g"
    assert extract_answer(_task("arithmetic", "12"), "no digits here") is None


def test_open_tasks_have_no_gold_answer():
    task = _task("open", None)
    assert not task.checkable and extract_answer(task, "Answer: 3") is None
    assert check(task, task.reference) is False
    with pytest.raises(ValueError, match="open-ended"):
        gold_reward(task, "anything")


def test_records_round_trip_through_jsonl(tmp_path):
    tasks = make_tasks("test", 4)
    record = to_sft_record(tasks[0])
    assert record == {"prompt": tasks[0].prompt, "completion": tasks[0].reference,
                      "task_id": tasks[0].id, "family": "arithmetic", "answer": tasks[0].answer}
    path = tmp_path / "tasks.jsonl"
    write_jsonl(tasks, path)
    assert read_jsonl(path) == tasks
    assert load_task_records([json.loads(line) for line in path.read_text().splitlines()]) == tasks


@pytest.mark.parametrize("change,field", [
    ({"family": "poetry"}, "family"),
    ({"answer": None}, "answer"),  # a checkable family needs an answer
    ({"answer": 12}, "answer"),
    ({"prompt": None}, "prompt"),
])
def test_bad_records_name_the_record_and_field(change, field):
    good = to_sft_record(make_tasks("test", 1)[0])
    with pytest.raises(DataError) as err:
        load_task_records([good, {**good, **change}], path="tasks.jsonl")
    assert (err.value.path, err.value.line, err.value.field) == ("tasks.jsonl", 2, field)


def test_open_record_with_an_answer_is_rejected_and_bad_json_names_the_line(tmp_path):
    open_record = to_sft_record(make_tasks("test", 1, families=("open",))[0])
    with pytest.raises(DataError, match="answer"):
        load_task_records([{**open_record, "answer": "yes"}])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(open_record) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        read_jsonl(path)
    path.write_text(json.dumps(open_record) + "\n\n" + json.dumps({**open_record, "family": "poem"}))
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'family'"):
        read_jsonl(path)


def test_bad_arguments_and_an_exhausted_family_raise():
    with pytest.raises(ValueError, match="split"):
        make_tasks("validation", 3)
    with pytest.raises(ValueError, match="unknown families"):
        make_tasks("test", 3, families=("arithmetic", "poetry"))
    with pytest.raises(ValueError, match="n_per_family"):
        make_tasks("test", -1)
    with pytest.raises(ValueError, match="distinct 'open' test tasks"):
        make_tasks("test", 5000, families=("open",))


def test_one_extractor_serves_the_verifiers_and_the_checkers():
    # The verifiers strip `$` and markdown around an answer; the checkers strip whitespace only
    # and normalize what they accept themselves, so "$12$" is not 12 for them.
    assert extract_final_answer("Answer: $12$") == "12"
    assert extract_final_answer("Answer: $12$", wrapping=None) == "$12$"
    assert not check(_task("arithmetic", "12"), "Answer: $12$")
    assert extract_final_answer("Answer:  \n\n 12 \n13", wrapping=None) == "12"
    assert extract_final_answer("so, yes", fallback=lambda text: text.split()[-1]) == "yes"
