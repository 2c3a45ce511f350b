"""`rlhf loop run/resume/status/history/export` and `rlhf report` on a loop folder."""

from __future__ import annotations

from typer.testing import CliRunner

from rlhfkit.cli import app


class Ran:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.output = " ".join(result.output.split())     # rich wraps lines at the test terminal's width


def invoke(*args) -> Ran:
    return Ran(CliRunner().invoke(app, [str(a) for a in args]))


def test_loop_commands_end_to_end(loop_files, tmp_path):
    out = tmp_path / "loop"
    flags = ["--output-dir", out, "--policy", "tiny", "--prompts", loop_files["prompts"],
             "--eval-tasks", loop_files["eval"], "--prompts-per-round", 2, "--samples-per-prompt", 2,
             "--pairs-per-prompt", 1, "--feedback",
             f"rm:{loop_files['rm']}", "--steps", 2, "--batch-size", 2, "--max-new-tokens", 4, "--kl-prompts", 0,
             "--precision", "fp32", "--rounds", 1]
    result = invoke("loop", "run", *flags)
    assert result.exit_code == 0, result.output
    assert "round 1 · train done" in result.output and "report:" in result.output

    result = invoke("loop", "status", out)
    assert "1 of 1 rounds registered" in result.output and "every configured round is done" in result.output
    result = invoke("loop", "history", out)
    assert result.exit_code == 0 and "rounds/r1/model/final" in result.output

    result = invoke("loop", "export", out, "--round", 1, "--output-dir", tmp_path / "r1")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "r1").iterdir())
    assert names == ["comparisons.jsonl", "eval.json", "labels.jsonl", "model", "prompts.jsonl", "round.json",
                     "samples.jsonl"]
    assert (tmp_path / "r1" / "model" / "model.safetensors").exists()
    assert invoke("loop", "export", out, "--round", 1, "--output-dir", tmp_path / "r1").exit_code != 0  # no overwrite

    result = invoke("report", out, "--out", tmp_path / "page.html")
    assert result.exit_code == 0 and "round 1" in (tmp_path / "page.html").read_text()

    result = invoke("loop", "resume", out, "--rounds", 2)                         # one more round later
    assert result.exit_code == 0, result.output
    assert "round 2 · register done" in result.output and "round 1 · sample" not in result.output


def test_loop_mistakes_are_one_line_errors(tmp_path):
    result = invoke("loop", "run", "--output-dir", tmp_path / "x", "--trainer", "dpoo")
    assert result.exit_code == 2 and "trainer" in result.output and "Traceback" not in result.output
    result = invoke("loop", "run", "--output-dir", tmp_path / "x", "--feedback", "human,rules")
    assert result.exit_code == 2 and "cannot be mixed" in result.output
    result = invoke("loop", "resume", tmp_path / "nothing")
    assert result.exit_code == 2 and "not a loop folder" in result.output
    result = invoke("loop", "history", tmp_path / "nothing")
    assert result.exit_code == 2 and "not a loop folder" in result.output


def test_a_bad_prompt_file_is_one_line_naming_file_line_and_field(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "What is 1 plus 1?", "answer": "2"}\n{"answer": "3"}\n')
    result = invoke("loop", "run", "--output-dir", tmp_path / "x", "--policy", "tiny", "--prompts", bad)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "prompts.jsonl:2" in result.output and "prompt" in result.output
