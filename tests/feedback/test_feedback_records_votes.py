"""Import records and vote parsing: clear errors, the shown-order ↔ imported-order mapping."""

import json

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.records import dense_ranks, parse_candidate_set, read_candidate_sets
from rlhfkit.feedback.votes import (
    VoteError,
    build_vote_input,
    format_ranking,
    pairwise_choice,
    parse_ranking,
    to_item_order,
    to_shown_order,
)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_candidate_sets_accepts_strings_messages_and_gold(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [
        json.dumps({"prompt": "hi", "responses": ["a", "b"], "gold": 1, "id": 7}),
        "",
        json.dumps({"prompt": [{"role": "user", "content": "rank"}], "responses": ["a", "b", "c"],
                    "gold": [5, 5, 2], "model_version": "v2", "meta": {"topic": "x"}}),
    ])
    first, second = read_candidate_sets(path)
    assert first.gold_ranks == (None, 0) and first.external_id == "7"
    assert second.gold_ranks == (1, 1, 0)  # (5, 5, 2) renumbered, ties kept
    assert second.model_version == "v2" and second.meta == {"topic": "x"}


@pytest.mark.parametrize("record, field", [
    ({"prompt": "", "responses": ["a", "b"]}, "prompt"),
    ({"prompt": "p", "responses": ["a"]}, "responses"),
    ({"prompt": "p", "responses": ["a", ""]}, "responses[1]"),
    ({"prompt": "p", "responses": ["a", "b"], "gold": 2}, "gold"),
    ({"prompt": "p", "responses": ["a", "b"], "gold": [0]}, "gold"),
    ({"prompt": [{"role": "robot", "content": "x"}], "responses": ["a", "b"]}, "prompt[0].role"),
    ({"prompt": "p", "responses": ["a", "b"], "respones": 1}, "respones"),
    ({"prompt": "p", "responses": [str(i) for i in range(10)]}, "responses"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, field):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "responses": ["a", "b"]}),
                                                json.dumps(record)])
    with pytest.raises(DataError) as info:
        read_candidate_sets(path)
    assert info.value.line == 2 and info.value.field == field
    assert str(info.value).startswith(f"{path}:2: field '{field}'")


def test_unknown_field_suggests_the_nearest_name():
    with pytest.raises(DataError, match="did you mean 'responses'"):
        parse_candidate_set({"prompt": "p", "responses": ["a", "b"], "respones": 1})


def test_invalid_json_line_is_reported(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "p", "responses": ["a", "b"]}', "{oops"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_candidate_sets(path)


def test_dense_ranks():
    assert dense_ranks([5, 5, 2]) == (1, 1, 0)
    assert dense_ranks([0, 3, 3, 9]) == (0, 1, 1, 2)


def test_parse_ranking_with_ties():
    # D > C > A = B over four shown candidates: D level 0, C level 1, A and B level 2.
    assert parse_ranking("D > C > A = B", 4) == (2, 2, 1, 0)
    assert parse_ranking("4>3>1=2", 4) == (2, 2, 1, 0)  # the number keys that were pressed
    assert parse_ranking("a=b=c", 3) == (0, 0, 0)
    assert format_ranking((2, 2, 1, 0)) == "D > C > A = B"


@pytest.mark.parametrize("text, message", [
    ("", "rank all"), ("A>B", "not ranked yet: C"), ("A>A>B", "twice"), ("A>>B>C", "empty place"),
    ("A>B>Z", "unknown candidate"), ("A>B>4", "unknown candidate"),
])
def test_parse_ranking_rejects_incomplete_or_unknown(text, message):
    with pytest.raises(VoteError, match=message):
        parse_ranking(text, 3)


def test_shown_order_maps_back_to_imported_order():
    # Shown order [2, 0, 1]: A on screen is response 2, B is response 0, C is response 1.
    # The annotator says A > B = C, shown ranks (0, 1, 1) -> response 2 rank 0, responses 0, 1 rank 1.
    order = [2, 0, 1]
    assert to_item_order((0, 1, 1), order) == [1, 1, 0]
    assert to_shown_order([1, 1, 0], order) == (0, 1, 1)


def test_pairwise_vote_inputs():
    assert build_vote_input("pairwise", 2, choice="A", strength="3").shown_ranks == (0, 1)
    assert build_vote_input("pairwise", 2, choice="B").shown_ranks == (1, 0)
    tie = build_vote_input("pairwise", 2, choice="tie", rationale="  same  ")
    assert tie.shown_ranks == (0, 0) and not tie.both_bad and tie.rationale == "same"
    bad = build_vote_input("pairwise", 2, choice="both_bad")
    assert bad.shown_ranks == (0, 0) and bad.both_bad
    assert pairwise_choice((0, 0), True) == "both_bad" and pairwise_choice((1, 0), False) == "B"
    for kwargs in ({"choice": "C"}, {"choice": None}, {"choice": "A", "strength": "4"},
                   {"choice": "tie", "strength": "2"}, {"choice": "A", "rationale": "x" * 5001}):
        with pytest.raises(VoteError):
            build_vote_input("pairwise", 2, **kwargs)
    with pytest.raises(VoteError, match="pairwise items only"):
        build_vote_input("ranking", 3, ranking="A>B>C", strength=2)
