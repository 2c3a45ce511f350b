"""Public dataset layouts read unchanged, each from a small fixture shaped like the real dataset
(tests/data/fixtures/: same field names and nesting, a few hand-written records)."""

import json
from pathlib import Path

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import holds_unpaired, parse_columns, read_preferences, read_sft
from rlhfkit.data.schemas import Message

FIXTURES = Path(__file__).parent / "fixtures"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_error(reader, path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        reader(path, **kwargs)
    return info.value


# ---------------------------------------------------------------------------- preference layouts


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn():
    first, second = read_preferences(FIXTURES / "hh_rlhf.jsonl")
    assert first.prompt == (Message("user", "What is the capital of France?"),)
    assert (first.chosen, first.rejected) == ("The capital of France is Paris.", "I don't know.")
    # multi-turn: every turn before the last "Assistant:" is the prompt, earlier replies included
    assert second.prompt == (Message("user", "Can you help me bake bread?"),
                             Message("assistant", "Sure. Do you have yeast?"),
                             Message("user", "Yes, dry yeast."))
    assert second.chosen == "Mix it with warm water and a pinch of sugar first."
    assert second.rejected == "Bread is bad for you."


def test_hh_rlhf_transcripts_that_differ_before_the_last_reply_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye!",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Bye\n\nAssistant: Whatever."}])
    err = read_error(read_preferences, path)
    assert str(err) == (f"{path}:1: field 'rejected': chosen and rejected transcripts differ before the last "
                        "'\\n\\nAssistant:' turn (they must share the conversation up to the final reply)")
    assert "\n" not in str(err)


def test_trl_standard_implicit_prompt_strings_share_leading_words():
    sky, math = read_preferences(FIXTURES / "trl_standard_implicit.jsonl")
    assert (sky.prompt, sky.chosen, sky.rejected) == ((Message("user", "The sky is"),), "blue.", "green.")
    assert (math.prompt, math.chosen, math.rejected) == ((Message("user", "Two plus two is"),), "four.", "five.")


def test_trl_standard_implicit_prompt_without_shared_words_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "Blue.", "rejected": "Green."}])
    err = read_error(read_preferences, path)
    assert (err.line, err.field) == (1, "chosen") and "share no leading words" in err.message


def test_trl_conversational_implicit_and_explicit_prompt():
    (implicit,) = read_preferences(FIXTURES / "trl_conversational_implicit.jsonl")
    (explicit,) = read_preferences(FIXTURES / "trl_conversational_explicit.jsonl")
    expected = ((Message("user", "What color is the sky?"),), "It is blue.", "It is green.")
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == expected
    assert (explicit.prompt, explicit.chosen, explicit.rejected) == expected


def test_ultrafeedback_binarized_split_is_picked_by_name(tmp_path):
    from datasets import Dataset, DatasetDict

    def row(prompt, good, bad):  # UltraFeedback binarized: prompt + full chosen/rejected conversations
        return {"prompt": prompt, "prompt_id": "id-" + prompt,
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": bad}],
                "score_chosen": 8.0, "score_rejected": 3.0}

    DatasetDict({"train_prefs": Dataset.from_list([row("Name a prime.", "7", "8")]),
                 "test_prefs": Dataset.from_list([row("Name a color.", "red", "loud")])}
                ).save_to_disk(str(tmp_path / "uf"))
    (pair,) = read_preferences(tmp_path / "uf", "train_prefs")
    assert (pair.prompt, pair.chosen, pair.rejected) == ((Message("user", "Name a prime."),), "7", "8")
    assert read_preferences(tmp_path / "uf", "test_prefs")[0].chosen == "red"
    err = read_error(read_preferences, tmp_path / "uf")  # default split "train" does not exist
    assert "split 'train' not found; available: train_prefs, test_prefs" in str(err)


def test_preference_record_that_matches_no_layout_lists_the_accepted_ones(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    err = read_error(read_preferences, path)
    assert str(err) == (f"{path}:1: no preference layout matches the fields ('question', 'good', 'bad'); accepted: "
                        "prompt + chosen + rejected; chosen + rejected conversations or HH-RLHF transcripts; "
                        "prompt + responses + ranks (rename other columns with data_columns, e.g. prompt=question)")


def test_column_mapping_renames_before_parsing(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "good": "a", "bad": "b", "id": 3}])
    (pair,) = read_preferences(path, columns="prompt=question, chosen=good,rejected=bad")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.meta) == ((Message("user", "q"),), "a", "b", {"id": 3})
    err = read_error(read_preferences, path, columns="prompt=title,chosen=good,rejected=bad")
    assert str(err) == f"{path}:1: field 'title': missing (data_columns maps it to 'prompt')"


@pytest.mark.parametrize("spec, message", [("prompt", "'prompt' is not field=column"),
                                           ("prompt=q,completion=q", "column 'q' is mapped twice")])
def test_bad_column_mapping(spec, message):
    with pytest.raises(DataError) as info:
        parse_columns(spec)
    assert message in str(info.value)
    assert parse_columns("") == {} and parse_columns("prompt=q") == {"q": "prompt"}


# ---------------------------------------------------------------------------- SFT layouts


def test_alpaca_instruction_input_output():
    first, second = read_sft(FIXTURES / "alpaca.json")
    assert first.prompt == (Message("user", "Give three tips for staying healthy."),)  # empty input: no blank line
    assert first.response == "1. Eat well.\n2. Exercise.\n3. Sleep."
    assert second.prompt == (Message("user", "Translate the sentence into French.\n\nI like cheese."),)
    assert second.response == "J'aime le fromage."


def test_sharegpt_conversations_map_speakers_to_roles():
    (ex,) = read_sft(FIXTURES / "sharegpt.json")
    assert ex.prompt == (Message("system", "You are terse."), Message("user", "Hi"),
                         Message("assistant", "Hello."), Message("user", "2 + 2?"))
    assert ex.response == "4"
    assert ex.meta == {"id": "a1"}


def test_sharegpt_unknown_speaker_names_the_field(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]}]))
    err = read_error(read_sft, path)
    assert str(err) == (f"{path}: record 1: field 'conversations[0].from': unknown speaker 'bot' "
                        "(use system, human, user, gpt, assistant, tool)")


def test_openai_tool_calls_are_kept_as_text_and_tool_turns_stay():
    (ex,) = read_sft(FIXTURES / "openai_tools.jsonl")
    assert ex.prompt == (
        Message("system", "You can check the weather."), Message("user", "Weather in Paris?"),
        Message("assistant", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        Message("tool", '{"temp_c": 18}'))
    assert ex.response == "It is 18 °C in Paris."


def test_sft_record_that_matches_no_layout_lists_the_accepted_ones(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"question": "q", "answer": "a"}])
    err = read_error(read_sft, path)
    assert str(err) == (f"{path}:1: no SFT layout matches the fields ('question', 'answer'); accepted: "
                        "prompt + completion (or response); messages; conversations (ShareGPT); "
                        "instruction + output (Alpaca) (rename other columns with data_columns, e.g. prompt=question)")


def test_sft_on_preference_data_says_so(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert "this is preference data" in read_error(read_sft, path).message


def test_sft_weight_and_kto_label(tmp_path):
    from rlhfkit.data.errors import SkipReport

    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "q1", "completion": "good", "label": True, "weight": 2.5},
        {"prompt": "q2", "completion": "bad", "label": False},
        {"prompt": "q3", "completion": "plain"}])
    everything = read_sft(path)  # reading only (e.g. scoring): every record, labels kept
    assert [(e.response, e.weight, e.desirable) for e in everything] == [
        ("good", 2.5, True), ("bad", 1.0, False), ("plain", 1.0, True)]
    skipped = SkipReport()
    kept = read_sft(path, skipped=skipped)  # training: the undesirable completion is left out, counted
    assert [e.response for e in kept] == ["good", "plain"]
    assert skipped.counts == {"undesirable (label false)": 1}


@pytest.mark.parametrize("record, field", [({"prompt": "q", "completion": "a", "weight": -1}, "weight"),
                                           ({"prompt": "q", "completion": "a", "weight": "2"}, "weight"),
                                           ({"prompt": "q", "completion": "a", "label": "no"}, "label")])
def test_bad_weight_or_label(tmp_path, record, field):
    err = read_error(read_sft, write_jsonl(tmp_path / "s.jsonl", [record]))
    assert (err.line, err.field) == (1, field)


def test_sft_data_is_not_unpaired_feedback(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": "a"}])
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    assert not holds_unpaired(sft) and holds_unpaired(kto)


def test_preference_reader_on_sft_data_says_it_looks_like_sft(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": "a"}])
    err = read_error(read_preferences, path)
    assert str(err) == (f"{path}:1: this looks like SFT data (prompt + completion, messages, ...), not preference "
                        "pairs: DPO and reward models need prompt + chosen + rejected; chosen + rejected "
                        "conversations or HH-RLHF transcripts; prompt + responses + ranks (unpaired feedback with a "
                        "true/false 'label' trains with --loss kto)")
