"""The `rlhf` command: help texts, and user mistakes shown as one clear line with exit code 2."""

import json

from typer.testing import CliRunner

from rlhfkit.cli import app

# A wide terminal so rich does not wrap the help and error lines we look for.
runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})


def one_line(text: str) -> str:
    return " ".join(text.split())


def invoke(*args):
    return runner.invoke(app, list(args))


def test_top_level_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("sft", "generate", "chat", "setup"):
        assert command in result.output


def test_sft_help_shows_flags_examples_and_choices():
    result = invoke("sft", "--help")
    assert result.exit_code == 0
    text = one_line(result.output)
    for flag in ("--lr", "--config", "--train-data", "--max-steps", "--packing"):
        assert flag in text
    assert "Examples" in text
    assert "rlhf sft --train-data data/sft.jsonl --max-steps 200" in text
    assert "rlhf sft --config sft.yaml --lr 1e-5" in text
    assert "[cosine|linear|constant]" in text
    assert "[auto|bf16|fp16|fp32]" in text


def test_unknown_flag_suggests_the_nearest():
    result = invoke("sft", "--lrr", "1")
    assert result.exit_code == 2
    assert "No such option: --lrr" in result.output
    assert "--lr" in result.output.replace("--lrr", "")


def test_malformed_data_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"prompt": "a", "completion": "b"}) + "\n"
        + json.dumps({"prompt": "c", "completion": "d"}) + "\n"
        + json.dumps({"prompt": "e"}) + "\n")
    result = invoke("sft", "--model", "tiny", "--train-data", "bad.jsonl", "--max-steps", "1")
    assert result.exit_code == 2
    text = one_line(result.output)
    assert "bad.jsonl:3: field 'completion': missing" in text
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # stopped before any training started


def test_invalid_json_line_in_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    result = invoke("sft", "--model", "tiny", "--train-data", "bad.jsonl")
    assert result.exit_code == 2
    assert "bad.jsonl:2: not valid JSON" in one_line(result.output)
    assert "Traceback" not in result.output


def test_missing_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("sft", "--model", "tiny", "--train-data", "data/missing.jsonl")
    assert result.exit_code == 2
    assert "data/missing.jsonl: no such file or folder" in one_line(result.output)


def test_yaml_typo_names_the_nearest_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.yaml").write_text("model: tiny\ntrain_data: d.jsonl\nmax_step: 3\n")
    result = invoke("sft", "--config", "sft.yaml")
    assert result.exit_code == 2
    text = one_line(result.output)
    assert "sft.yaml: unknown key 'max_step'" in text
    assert "did you mean 'max_steps'?" in text
    assert "Traceback" not in result.output


def test_bad_value_from_a_flag_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("sft", "--model", "tiny", "--train-data", "d.jsonl", "--precision", "bf32")
    assert result.exit_code == 2
    assert "'precision' must be one of auto, bf16, fp16, fp32" in one_line(result.output)
    assert "Traceback" not in result.output


def test_missing_train_data_exits_2():
    result = invoke("sft", "--model", "tiny")
    assert result.exit_code == 2
    assert "train_data is required" in one_line(result.output)


def test_non_integer_flag_is_rejected_by_the_parser():
    result = invoke("sft", "--max-steps", "abc")
    assert result.exit_code == 2
    assert "Invalid value for '--max-steps'" in result.output
