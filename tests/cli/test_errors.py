"""`cli.errors.GuardedGroup`: whatever a command raises reaches the user as one line with
the right exit code; `rlhf --verbose` keeps the traceback; Ctrl-C names a checkpoint only
when there is one on disk."""

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.cli.errors import GuardedGroup
from rlhfkit.config import ConfigError

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})


class TrainingInterrupted(KeyboardInterrupt):
    """Shaped like `train.engine.TrainingInterrupted`: the step and the last checkpoint (or None)."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__()
        self.step, self.checkpoint = step, checkpoint


@pytest.fixture
def raising():
    """invoke(exception, *root_flags) → the CliRunner result of a command that raises it."""
    app = typer.Typer(cls=GuardedGroup)

    @app.callback()
    def main(verbose: bool = typer.Option(False, "--verbose", "-v")):
        """A group like `rlhf`, with its --verbose."""

    box = {}

    @app.command()
    def run():
        raise box["error"]

    @app.command()
    def typed(n: int = typer.Option(1)):
        pass

    def invoke(error, *flags):
        box["error"] = error
        return runner.invoke(app, [*flags, "run"])

    invoke.app = app
    return invoke


def lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_an_unexpected_exception_is_one_internal_error_line(raising):
    result = raising(TypeError("unsupported operand\nsecond line"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert lines(result) == ["error: internal error (TypeError: unsupported operand) — rerun with "
                             "`rlhf --verbose ...` for the traceback and report it"]


@pytest.mark.parametrize("flag", ["--verbose", "-v"])
def test_verbose_keeps_the_exception_for_the_traceback(raising, flag):
    result = raising(TypeError("boom"), flag)
    assert isinstance(result.exception, TypeError) and str(result.exception) == "boom"


def test_a_user_error_is_its_message_with_exit_2(raising):
    result = raising(ConfigError("'lr' must be a number, got 'fast'"))
    assert result.exit_code == 2
    assert lines(result) == ["error: 'lr' must be a number, got 'fast'"]


@pytest.mark.parametrize("error, line", [
    (PermissionError(13, "Permission denied", "runs/x/metrics.jsonl"),
     "error: runs/x/metrics.jsonl: permission denied"),
    (IsADirectoryError(21, "Is a directory", "out.jsonl"), "error: out.jsonl: is a directory"),
    (OSError(28, "No space left on device"), "error: no space left on device"),
])
def test_an_os_error_names_the_path_and_reason(raising, error, line):
    result = raising(error)
    assert result.exit_code == 1
    assert lines(result) == [line]


def test_ctrl_c_with_a_checkpoint_on_disk_names_it(raising, tmp_path):
    checkpoint = tmp_path / "checkpoint-40"
    checkpoint.mkdir()
    result = raising(TrainingInterrupted(step=43, checkpoint=checkpoint))
    assert result.exit_code == 130
    assert lines(result) == [f"interrupted at step 43; the checkpoint {checkpoint} resumes it (run the same command)"]


@pytest.mark.parametrize("error", [
    TrainingInterrupted(step=3, checkpoint=None),
    TrainingInterrupted(step=3, checkpoint=Path("/nonexistent/checkpoint-2")),  # never claim one not on disk
    KeyboardInterrupt(),  # Ctrl-C while a model loads
])
def test_ctrl_c_without_a_checkpoint_says_nothing_to_resume(raising, error):
    result = raising(error)
    assert result.exit_code == 130
    assert lines(result) == ["interrupted before any checkpoint was written; nothing to resume"]


def test_exit_and_usage_errors_are_left_to_typer(raising):
    assert raising(typer.Exit(3)).exit_code == 3
    result = runner.invoke(raising.app, ["typed", "--n", "many"])
    assert result.exit_code == 2 and "Invalid value for '--n'" in result.output
