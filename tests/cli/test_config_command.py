"""`cli.config.config_command`: one `--flag` per field of a config dataclass plus `--config FILE`;
a flag overrides the YAML file, which overrides the dataclass default; mistakes are one line."""

from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.cli.config import config_command
from rlhfkit.config import Config, param

# A wide terminal so rich does not wrap the help and error lines we look for.
runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})


@dataclass(frozen=True)
class ToyConfig(Config):
    kind = "toy"
    max_steps: int = param(3, "optimizer steps to run")
    lr: float = param(0.5, "peak learning rate")
    verbose: bool = param(False, "print every step")
    schedule: str = param("cosine", "learning-rate schedule", choices=("cosine", "linear", "constant"))
    widths: tuple[int, ...] = param((1, 2), "layer widths, comma-separated")
    tags: list[str] = param(["x"], "free-form tags")


@pytest.fixture
def cli():
    """invoke(*args) → (CliRunner result, the ToyConfig the command ran with or None)."""
    app = typer.Typer()
    seen: list[ToyConfig] = []

    @app.callback()
    def main():
        """A group, so the command is called by its name as in `rlhf NAME`."""

    config_command(app, "toy", ToyConfig, seen.append, help="Train a toy model.",
                   examples="Examples:\n\n  rlhf toy --max-steps 5")

    def invoke(*args):
        result = runner.invoke(app, ["toy", *map(str, args)])
        return result, (seen[-1] if seen else None)

    return invoke


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_no_flags_gives_the_dataclass_defaults(cli):
    result, cfg = cli()
    assert result.exit_code == 0, result.output
    assert cfg == ToyConfig()
    assert (cfg.max_steps, cfg.lr, cfg.verbose, cfg.schedule, cfg.widths, cfg.tags) == (3, 0.5, False, "cosine",
                                                                                       (1, 2), ("x",))


def test_flags_are_parsed_to_the_field_types(cli):
    result, cfg = cli("--max-steps", 7, "--lr", "1e-3", "--verbose", "--schedule", "linear",
                      "--widths", "3, 4,5", "--tags", "a,b")
    assert result.exit_code == 0, result.output
    assert cfg.max_steps == 7 and type(cfg.max_steps) is int
    assert cfg.lr == 1e-3 and type(cfg.lr) is float
    assert cfg.verbose is True
    assert cfg.schedule == "linear"
    assert cfg.widths == (3, 4, 5) and all(type(w) is int for w in cfg.widths)
    assert cfg.tags == ("a", "b")


def test_a_flag_of_the_wrong_type_is_refused_before_running(cli):
    result, cfg = cli("--max-steps", "many")
    assert result.exit_code == 2 and cfg is None
    assert "--max-steps" in result.output and "Traceback" not in result.output


def test_flag_overrides_yaml_which_overrides_the_default(cli, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("max_steps: 9\nlr: 0.25\nverbose: true\nwidths: [6, 7]\n")
    result, cfg = cli("--config", path, "--lr", "0.125", "--no-verbose")
    assert result.exit_code == 0, result.output
    assert cfg.max_steps == 9  # YAML over the default
    assert cfg.widths == (6, 7)
    assert cfg.lr == 0.125  # the flag over the YAML
    assert cfg.verbose is False  # --no-verbose is given, not "unset": it overrides `verbose: true`
    assert cfg.schedule == "cosine" and cfg.tags == ("x",)  # in neither: the default


def test_unknown_yaml_key_is_one_line_naming_the_nearest_field(cli, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("max_step: 9\n")
    result, cfg = cli("--config", path)
    assert result.exit_code == 2 and cfg is None
    (line,) = error_lines(result)
    assert line == f"error: {path}: unknown key 'max_step' for ToyConfig; did you mean 'max_steps'?"


def test_a_bad_choice_is_one_line_listing_the_choices(cli):
    result, cfg = cli("--schedule", "cosin")
    assert result.exit_code == 2 and cfg is None
    (line,) = error_lines(result)
    assert line == "error: command line: 'schedule' must be one of cosine, linear, constant; got 'cosin'"


def test_a_bad_value_in_yaml_is_one_line_naming_the_file(cli, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("lr: fast\n")
    result, cfg = cli("--config", path)
    assert result.exit_code == 2 and cfg is None
    (line,) = error_lines(result)
    assert line == f"error: {path}: 'lr' must be a number, got 'fast'"


def test_help_shows_every_field_with_its_help_default_and_choices(cli):
    result, cfg = cli("--help")
    assert result.exit_code == 0 and cfg is None
    text = " ".join(result.output.split())
    assert "Train a toy model." in text and "rlhf toy --max-steps 5" in text
    # One row per option, keyed by its flag: the field's help sits on its own flag's row.
    rows = {}
    for line in result.output.splitlines():
        cells = line.strip("│ \n")
        if cells.startswith("--"):
            rows[cells.split()[0]] = " ".join(cells.split())
    assert "YAML file with any of the fields below" in rows["--config"]
    for flag, help_text in [("--max-steps", "optimizer steps to run [default: 3]"),
                            ("--lr", "peak learning rate [default: 0.5]"),
                            ("--verbose", "print every step [default: --no-verbose]"),
                            ("--schedule", "learning-rate schedule [cosine|linear|constant] [default: cosine]"),
                            ("--widths", "layer widths, comma-separated [default: 1,2]"),
                            ("--tags", "free-form tags [default: x]")]:
        assert help_text in rows[flag], rows
    assert "--no-verbose" in rows["--verbose"]
    assert set(rows) == {"--config", "--max-steps", "--lr", "--verbose", "--schedule", "--widths", "--tags", "--help"}


@dataclass(frozen=True)
class RunConfig(Config):
    kind = "run"
    output_dir: str = param("runs/run", "run folder")
    tracker: str = param("none", "tracker", choices=("none", "tensorboard", "wandb"))
    algorithm: str = param("run", "fixed by the command", choices=("run", "other"))
    train_data: str = param("", "training data")


@pytest.fixture
def run_cli():
    """invoke(*args) → (result, the RunConfig the command ran with or None); `toy` is registered too."""
    app = typer.Typer()
    seen: list[Config] = []

    @app.callback()
    def main():
        """A group."""

    config_command(app, "run", RunConfig, seen.append, help="Run.", examples="")
    config_command(app, "toy", ToyConfig, seen.append, help="Toy.", examples="")
    return lambda *args: (runner.invoke(app, list(map(str, args))), seen[-1] if seen else None)


def test_an_output_dir_that_is_a_file_fails_before_running(run_cli, tmp_path):
    (tmp_path / "f").write_text("")
    for value, message in [(tmp_path / "f", f"--output-dir {tmp_path / 'f'} is a file; give a folder"),
                           (tmp_path / "f" / "sub", f"{tmp_path / 'f'} is a file, so nothing can be written")]:
        result, cfg = run_cli("run", "--output-dir", value)
        assert result.exit_code == 2 and cfg is None
        (line,) = error_lines(result)
        assert line.startswith("error: --output-dir") and message in line


def test_a_tracker_that_is_not_installed_fails_before_running(run_cli, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result, cfg = run_cli("run", "--output-dir", tmp_path / "r", "--tracker", "wandb")
    assert result.exit_code == 2 and cfg is None
    assert error_lines(result) == ["error: --tracker wandb needs the wandb package: pip install wandb "
                                   "(or --tracker none)"]
    result, cfg = run_cli("run", "--output-dir", tmp_path / "r", "--tracker", "none")
    assert result.exit_code == 0 and cfg.tracker == "none"


def test_a_config_file_of_another_recipe_names_its_command(run_cli, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("recipe: toy\nmax_steps: 2\n")
    result, cfg = run_cli("run", "--config", path)
    assert result.exit_code == 2 and cfg is None
    assert error_lines(result) == [f"error: {path}: its recipe: line says 'toy', but this is `root run`; run it "
                                   f"with `root toy --config {path}`, or delete the recipe: line"]
    result, cfg = run_cli("toy", "--config", path)  # its own recipe: accepted
    assert result.exit_code == 0 and cfg.max_steps == 2


def test_a_fixed_algorithm_is_hidden_from_help_but_accepted(run_cli, tmp_path):
    result, _ = run_cli("run", "--help")
    assert "--algorithm" not in result.output and "--tracker" in result.output
    assert "[default: runs/run]" in result.output and "[default: ]" not in result.output
    result, cfg = run_cli("run", "--output-dir", tmp_path / "r", "--algorithm", "other")
    assert result.exit_code == 0 and cfg.algorithm == "other"
