"""Readers: every accepted layout and file format, and bad input reported as file:line: field."""

import json

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import MAX_REPORTED_ERRORS, iter_records, read_preferences, read_sft, read_unpaired
from rlhfkit.data.schemas import Message, Provenance

Q = (Message("user", "What is 2 + 2?"),)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def read_error(reader, path) -> DataError:
    with pytest.raises(DataError) as info:
        reader(path)
    return info.value


# ---------------------------------------------------------------------------- SFT layouts


def test_sft_standard_prompt_completion(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "What is 2 + 2?", "completion": "4", "id": 7}])
    (ex,) = read_sft(path)
    assert ex.prompt == Q
    assert ex.response == "4"
    assert ex.meta == {"id": 7}  # unknown fields are kept, the known ones are not repeated


def test_sft_response_is_an_alias_of_completion(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "What is 2 + 2?", "response": "4"}])
    assert read_sft(path)[0].response == "4"


def test_sft_conversational_messages_last_assistant_turn_is_the_target(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": messages}])
    (ex,) = read_sft(path)
    assert ex.prompt == (Message("system", "Be brief."), Message("user", "Hi"),
                         Message("assistant", "Hello."), Message("user", "2 + 2?"))
    assert ex.response == "4"


def test_sft_conversational_prompt_and_completion(tmp_path):
    # TRL's conversational prompt/completion: both are message lists.
    path = write_jsonl(tmp_path / "sft.jsonl", [{
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
        "completion": [{"role": "assistant", "content": "4"}]}])
    (ex,) = read_sft(path)
    assert ex.prompt == (Message("system", "Be brief."), Message("user", "2 + 2?"))
    assert ex.response == "4"


# ---------------------------------------------------------------------------- file formats


def test_json_list_pretty_printed(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}], indent=2))
    assert [(ex.prompt[0].content, ex.response) for ex in read_sft(path)] == [("a", "b"), ("c", "d")]


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"data": [{"prompt": "a", "completion": "b"}]}, indent=2))
    assert read_sft(path)[0].response == "b"


def test_json_lines_saved_with_json_suffix(tmp_path):
    path = write_jsonl(tmp_path / "sft.json", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    assert [ex.response for ex in read_sft(path)] == ["b", "d"]


def test_json_lines_saved_as_json_report_the_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.json", [{"prompt": "a", "completion": "b"}, '{"prompt": "c",'])
    err = read_error(read_sft, path)
    assert (err.path, err.line) == (str(path), 2)
    assert "not valid JSON" in str(err)


def test_invalid_json_document_names_the_line(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]\n')
    err = read_error(read_sft, path)
    assert err.line == 3
    assert "not valid JSON" in str(err)


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "sft.parquet", [
        {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6"}]},
    ])
    examples = read_sft(path)
    assert [(ex.prompt, ex.response) for ex in examples] == [
        ((Message("user", "2 + 2?"),), "4"), ((Message("user", "3 + 3?"),), "6")]


def test_parquet_bad_row_is_numbered_from_one(tmp_path):
    path = write_parquet(tmp_path / "prefs.parquet", [
        {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": None}])
    err = read_error(read_preferences, path)
    # a Parquet row is a record, not a line of text: "record 2", never "line 2"
    assert (err.line, err.record, err.field) == (None, 2, "rejected")
    assert str(err) == f"{path}: record 2: field 'rejected': missing"


def test_datasets_folder_saved_with_save_to_disk(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "q", "chosen": "good", "rejected": "bad"}]).save_to_disk(str(tmp_path / "ds"))
    (pair,) = read_preferences(tmp_path / "ds")
    assert (pair.prompt, pair.chosen, pair.rejected) == ((Message("user", "q"),), "good", "bad")


def test_datasets_dict_folder_picks_the_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"prompt": "q", "completion": "train answer"}]),
                 "test": Dataset.from_list([{"prompt": "q", "completion": "test answer"}])}
                ).save_to_disk(str(tmp_path / "dd"))
    assert read_sft(tmp_path / "dd", split="test")[0].response == "test answer"
    err = read_error(lambda p: read_sft(p, split="validation"), tmp_path / "dd")
    assert "split 'validation' not found" in str(err)
    assert "train" in str(err) and "test" in str(err)


# ---------------------------------------------------------------------------- preferences


def test_preference_standard_with_provenance(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{
        "prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "label": 0.75, "margin": 2,
        "both_bad": False, "annotator": "alice", "source": "human", "rationale": "5 is wrong",
        "round": 3, "model_version": "sft-v1", "batch": "b7"}])
    (pair,) = read_preferences(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == (Q, "4", "5")
    assert (pair.label, pair.margin, pair.both_bad) == (0.75, 2.0, False)
    assert pair.provenance == Provenance(annotator="alice", source="human", rationale="5 is wrong",
                                         round=3, model_version="sft-v1")
    assert pair.meta == {"batch": "b7"}


def test_preference_defaults_hard_label_and_unknown_source(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    (pair,) = read_preferences(path)
    assert pair.label == 1.0 and pair.margin is None and not pair.both_bad
    assert pair.provenance == Provenance()


def test_preference_tie_label_kept(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "label": 0.5}])
    assert read_preferences(path)[0].is_tie


def test_preference_conversational_with_implicit_prompt(tmp_path):
    # TRL's implicit-prompt layout: the shared leading turns are the prompt.
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", [{
        "chosen": turns + [{"role": "assistant", "content": "4"}],
        "rejected": turns + [{"role": "assistant", "content": "22"}]}])
    (pair,) = read_preferences(path)
    assert pair.prompt == (Message("system", "Be brief."), Message("user", "2 + 2?"))
    assert (pair.chosen, pair.rejected) == ("4", "22")


def test_preference_conversational_with_explicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{
        "prompt": [{"role": "user", "content": "2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "22"}]}])
    (pair,) = read_preferences(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == ((Message("user", "2 + 2?"),), "4", "22")


def test_implicit_prompt_needs_a_shared_prefix(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{
        "chosen": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "x"}],
        "rejected": [{"role": "user", "content": "b?"}, {"role": "assistant", "content": "y"}]}])
    err = read_error(read_preferences, path)
    assert (err.line, err.field) == (1, "chosen")
    assert "share the prompt" in str(err)


def test_rankings_expanded_to_pairs(tmp_path):
    preference = pytest.importorskip("rlhfkit.data.preference")  # written by another worker
    if not hasattr(preference, "ranking_to_pairs"):
        pytest.skip("rlhfkit.data.preference.ranking_to_pairs not written yet")
    # ranks over [A, B, C] = (1, 0, 1): B is best, A and C tie. Pairs in index order:
    #   (A, B): B ≻ A, label 1;  (A, C): tie, label 0.5, A first;  (B, C): B ≻ C, label 1.
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "q0", "chosen": "x", "rejected": "y"},
        {"prompt": "q", "responses": ["A", "B", "C"], "ranks": [1, 0, 1], "annotator": "bob", "round": 2},
    ])
    pairs = read_preferences(path)
    assert [(p.prompt[0].content, p.chosen, p.rejected, p.label) for p in pairs] == [
        ("q0", "x", "y", 1.0), ("q", "B", "A", 1.0), ("q", "A", "C", 0.5), ("q", "B", "C", 1.0)]
    assert all(p.provenance == Provenance(annotator="bob", round=2) for p in pairs[1:])


def test_bad_ranking_names_the_field(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "responses": ["A", "B"], "ranks": [0, -1]}])
    err = read_error(read_preferences, path)
    assert (err.line, err.field) == (1, "ranks[1]")


@pytest.mark.parametrize("record", [
    {"prompt": "q", "chosen": "a", "rejected": "b", "both_bad": "false"},
    {"prompt": "q", "responses": ["A", "B"], "ranks": [0, 1], "both_bad": "false"},
])
def test_both_bad_must_be_a_bool(tmp_path, record):
    path = write_jsonl(tmp_path / "prefs.jsonl", [record])
    err = read_error(read_preferences, path)
    assert (err.line, err.field) == (1, "both_bad")


# ---------------------------------------------------------------------------- unpaired


def test_unpaired_label_and_provenance(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "q", "completion": "good", "label": True, "source": "rule", "round": 1},
        {"prompt": "q", "response": "bad", "label": False, "annotator": 12}])
    up, down = read_unpaired(path)
    assert (up.response, up.desirable, up.provenance) == ("good", True, Provenance(source="rule", round=1))
    assert (down.response, down.desirable, down.provenance.annotator) == ("bad", False, "12")


@pytest.mark.parametrize("label", [1, 0, "true", None])
def test_unpaired_label_must_be_a_bool(tmp_path, label):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": label}])
    err = read_error(read_unpaired, path)
    assert (err.line, err.field) == (1, "label")


# ---------------------------------------------------------------------------- bad input


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}, "", '{"prompt": "c", "completion"'])
    err = read_error(read_sft, path)
    assert (err.path, err.line) == (str(path), 3)  # the blank line 2 still counts
    assert "not valid JSON" in str(err)
    assert str(err).startswith(f"{path}:3: ")


def test_json_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", ['["a", "b"]'])
    err = read_error(read_sft, path)
    assert err.line == 1 and "expected a JSON object, got list" in str(err)


def test_missing_completion_names_the_field_and_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    err = read_error(read_sft, path)
    assert (err.path, err.line, err.field) == (str(path), 2, "completion")
    assert f"{path}:2: field 'completion': missing" in str(err)


def test_missing_prompt(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"completion": "b"}])
    err = read_error(read_sft, path)
    assert (err.line, err.field) == (1, "prompt")


def test_missing_chosen_names_the_field_and_line(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "q", "rejected": "b"}])
    err = read_error(read_preferences, path)
    assert (err.line, err.field) == (2, "chosen")
    assert ":2: field 'chosen': missing" in str(err)


def test_empty_completion(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": "  \n"}])
    err = read_error(read_sft, path)
    assert (err.line, err.field) == (1, "completion")
    assert "empty" in err.message


def test_empty_assistant_message(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}])
    err = read_error(read_sft, path)
    assert err.field == "messages[1].content"
    assert "empty response" in err.message


def test_empty_rejected(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": ""}])
    assert read_error(read_preferences, path).field == "rejected"


def test_wrong_role(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    err = read_error(read_sft, path)
    assert err.field == "messages[0].role"
    assert "unknown role 'human'" in err.message


def test_last_message_must_be_the_assistant(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}])
    err = read_error(read_sft, path)
    assert err.field == "messages" and "assistant" in err.message


@pytest.mark.parametrize("label", [1.5, -0.1, True, "1", float("nan")])
def test_preference_label_outside_unit_interval(tmp_path, label):
    path = tmp_path / "prefs.jsonl"
    # json.dumps writes NaN, which Python's json reads back; a reader must still refuse it.
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "label": label}) + "\n")
    err = read_error(read_preferences, path)
    assert (err.line, err.field) == (1, "label")


def test_non_integer_round(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "round": "two"}])
    assert read_error(read_preferences, path).field == "round"


def test_several_bad_lines_in_one_error(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "a", "completion": "b"},                      # 1 ok
        {"prompt": "a"},                                         # 2 missing completion
        {"prompt": "a", "completion": "b"},                      # 3 ok
        '{"prompt": ',                                           # 4 not JSON
        {"messages": [{"role": "robot", "content": "x"}]},       # 5 wrong role
    ])
    err = read_error(read_sft, path)
    assert [(e.line, e.field) for e in err.errors] == [(2, "completion"), (4, None), (5, "messages[0].role")]
    text = str(err)
    assert "3 bad records" in text
    for n in (2, 4, 5):
        assert f"{path}:{n}:" in text


def test_one_problem_on_every_record_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a"}] * 3)   # completion missing, three times
    err = read_error(read_sft, path)
    assert [e.line for e in err.errors] == [1, 2, 3]
    assert "\n" not in str(err)
    assert str(err).startswith(f"{path}:1: field 'completion': ") and str(err).endswith("(the same on 2 more records)")


def test_error_list_is_capped(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a"}, {"completion": "b"}] * MAX_REPORTED_ERRORS)
    err = read_error(read_sft, path)
    assert len(err.errors) == MAX_REPORTED_ERRORS
    assert [e.line for e in err.errors] == list(range(1, MAX_REPORTED_ERRORS + 1))
    assert f"first {MAX_REPORTED_ERRORS} shown" in str(err)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", ""),
                                        ("list.json", "[]")])
def test_empty_file_has_no_records(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    err = read_error(read_sft, path)
    assert err.path == str(path) and "no records" in str(err)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "sft.csv"
    path.write_text("prompt,completion\na,b\n")
    err = read_error(read_sft, path)
    assert "unknown file type '.csv'" in str(err)


def test_missing_file(tmp_path):
    err = read_error(read_sft, tmp_path / "nope.jsonl")
    assert err.path == str(tmp_path / "nope.jsonl") and "no such file or folder" in str(err)


def test_missing_relative_file_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was sent to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    err = read_error(read_sft, "data/sft.jsonl")
    assert "no such file or folder" in str(err)


def test_hub_id_failure_is_a_data_error(monkeypatch):
    import datasets

    calls = []

    def offline(name, split):
        calls.append((name, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    err = read_error(read_sft, "someone/some_dataset")
    assert calls == [("someone/some_dataset", "train")]
    assert "cannot load dataset 'someone/some_dataset' from the hub" in str(err)


def test_iter_records_without_error_list_raises_at_the_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "nope"])
    records = iter_records(path)
    assert next(records)[0] == {"prompt": "a"}
    with pytest.raises(DataError) as info:
        next(records)
    assert info.value.line == 2
