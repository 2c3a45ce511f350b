"""Every `rlhf` command, run with a broken input, ends in exactly one `error:` line and a
non-zero exit code, never a traceback.

The commands are enumerated from the typer app, so a new command fails
`test_every_command_has_a_broken_input` until it gets an entry in BROKEN.
"""


import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.cli import app

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})

# command path → (arguments after it, a fragment the one error line must hold). Each input is
# wrong in a way the command finds before loading any real model (tiny at most).
BROKEN: dict[str, tuple[list[str], str]] = {
    "sft": (["--model", "tiny", "--train-data", "missing.jsonl"], "missing.jsonl: no such file"),
    "grpo": (["--model", "runs/nope", "--tasks", "demo", "--output-dir", "afile.txt"], "afile.txt is a file"),
    "rloo": (["--model", "tiny", "--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    "remax": (["--model", "tiny", "--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    "reinforce": (["--model", "tiny", "--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    "ppo": (["--model", "tiny", "--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    "best-of-n": (["--model", "tiny", "--tasks", "demo", "--out", "adir"], "--out adir is a folder"),
    "expert-iter": (["--model", "tiny", "--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    "dpo": (["--model", "runs/nope", "--train-data", "pairs.jsonl"], "no such model folder: runs/nope"),
    "online-dpo": (["--model", "tiny", "--tasks", "demo", "--tracker", "wandb", "--output-dir", "afile.txt/run"],
                   "afile.txt is a file"),
    "generate": (["--model", "adir", "-p", "hi"], "'adir' is a folder but not a model"),
    "chat": (["--model", "tiny", "--max-new-tokens", "0"], "max_new_tokens must be ≥ 1"),
    "setup": ([], "afile.txt/cache: not a directory"),  # RLHFKIT_CACHE under a file, see below
    "demo": (["--model", "runs/nope", "--output-dir", "adir/demo"], "no such model folder: runs/nope"),
    "eval": (["--model", "afile.txt"], "afile.txt"),
    "report": (["runs/nope"], "runs/nope"),
    "push": (["runs/nope", "--to", "adir/x"], "runs/nope: no such run or model folder"),
    "loop run": (["--policy", "tiny", "--prompts", "missing.jsonl", "--output-dir", "adir/loop"],
                 "missing.jsonl: no such file"),
    "loop resume": (["runs/nope"], "runs/nope is not a loop folder"),
    "loop status": (["runs/nope"], "runs/nope is not a loop folder"),
    "loop history": (["runs/nope"], "runs/nope is not a loop folder"),
    "loop export": (["runs/nope", "--round", "1", "--output-dir", "adir/x"], "runs/nope is not a loop folder"),
    "rm train": (["--model", "tiny", "--train-data", "missing.jsonl"], "missing.jsonl: no such file"),
    "rm eval": (["--model", "runs/nope", "--data", "prefs.jsonl"], "model folder: runs/nope"),
    "rm score": (["--model", "runs/nope", "--data", "pairs.jsonl", "--out", "o.jsonl"], "pairs.jsonl:1"),
    "prm data": (["--out", "o.jsonl", "--families", "strings"], "exact only for"),
    "prm train": (["--model", "tiny", "--train-data", "missing.jsonl"], "missing.jsonl: no such file"),
    "label serve": (["--db", "afile.txt/x.db"], "afile.txt"),
    "label create-admin": (["alice", "--password", "short", "--db", "adir/f.db"], "a password needs 10"),
    "label add-annotator": (["bob", "--password", "short", "--db", "adir/f.db"], "a password needs 10"),
    "label import": (["missing.jsonl", "--project", "p", "--db", "adir/f.db"], "missing.jsonl: no such file"),
    "label release": (["--project", "p", "--db", "adir/f.db"], "no project named 'p'"),
    "label deactivate": (["nobody", "--db", "adir/f.db"], "no account named 'nobody'"),
    "label activate": (["nobody", "--db", "adir/f.db"], "no account named 'nobody'"),
    "label reset-password": (["nobody", "--password", "velvet otter 42", "--db", "adir/f.db"],
                             "no account named 'nobody'"),
    "label revoke-sessions": (["nobody", "--db", "adir/f.db"], "no account named 'nobody'"),
    "label members": (["--project", "p", "--db", "adir/f.db"], "no project named 'p'"),
    "label export": (["o.jsonl", "--project", "p", "--format", "nope", "--db", "adir/f.db"], "unknown format"),
    "label backup": (["out.db", "--db", "adir/missing.db"], "adir/missing.db: no such database file"),
    "label restore": (["afile.txt", "--db", "adir/f.db"], "afile.txt: not a SQLite database file"),
    "label audit": (["--since", "soon", "--db", "adir/f.db"], "--since 'soon': not a time"),
    "judge pairs": (["--data", "missing.jsonl", "--out", "o.jsonl", "--judge", "tiny"], "missing.jsonl"),
    "judge agreement": (["--data", "missing.jsonl", "--judge", "tiny"], "missing.jsonl"),
    "judge constitutional": (["--prompts", "missing.jsonl", "--output-dir", "adir/c", "--judge", "tiny"],
                             "missing.jsonl"),
}


def command_paths(group, prefix: str = "") -> list[str]:
    """Every leaf command of the click group behind the typer app, as typed after `rlhf`."""
    paths = []
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        paths += command_paths(cmd, path + " ") if hasattr(cmd, "commands") else [path]
    return paths


COMMANDS = command_paths(typer.main.get_command(app))


def test_every_command_has_a_broken_input():
    assert len(COMMANDS) > 25  # the enumeration found the groups' commands too
    missing = [c for c in COMMANDS if c not in BROKEN]
    assert not missing, f"add a broken input to BROKEN for: {', '.join('rlhf ' + c for c in missing)}"
    assert not set(BROKEN) - set(COMMANDS), "BROKEN names commands that no longer exist"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_broken_input_is_one_error_line_and_no_traceback(command, tmp_path, monkeypatch):
    if command not in BROKEN:
        pytest.fail(f"rlhf {command} has no broken input in BROKEN")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("not a folder\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "response_a": "b", "response_b": "c"}\n')
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "afile.txt" / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_server(*args, **kwargs):
        raise AssertionError("the broken `label serve` input started the server")

    monkeypatch.setattr("uvicorn.run", no_server)
    args, fragment = BROKEN[command]
    result = runner.invoke(app, [*command.split(), *args])

    # An exception that escaped the command is kept by CliRunner instead of printed: none may.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.output
    assert error_lines[0].startswith("error: "), result.output
    assert "internal error" not in error_lines[0], error_lines[0]
    assert fragment in " ".join(result.output.split()), result.output
