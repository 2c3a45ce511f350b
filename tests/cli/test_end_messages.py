"""Every training command ends naming what it wrote and the commands that come next
(`cli.outputs`), and every suggested command is one the `rlhf` app accepts as written."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.cli.config import config_command
from rlhfkit.cli.outputs import FOLLOW_UPS, print_run_outputs, run_outputs
from rlhfkit.config import Config, param

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})
ROOT = typer.main.get_command(app)
# Commands generated from a config that train no model: they end with their own lines.
NOT_TRAINING = {"eval", "loop"}


def config_kinds(group) -> set[str]:
    kinds = set()
    for cmd in group.commands.values():
        kinds |= config_kinds(cmd) if hasattr(cmd, "commands") else {getattr(cmd.callback, "config_kind", None)}
    return kinds - {None}


def parses(command: str) -> None:
    """Parse `command` (a line starting with `rlhf`) with the real app: an unknown command or
    flag raises a usage error; nothing runs."""
    words = shlex.split(command)
    assert words[0] == "rlhf", command
    cmd, args = ROOT, words[1:]
    while hasattr(cmd, "commands"):
        assert args and args[0] in cmd.commands, f"no such command: {command}"
        cmd, args = cmd.commands[args[0]], args[1:]
    cmd.make_context(cmd.name, args)


def test_parses_refuses_an_unknown_flag_or_command():
    parses("rlhf dpo --model m --train-data PAIRS")
    for wrong in ("rlhf dpo --model m --train-file PAIRS", "rlhf rm evaluate --model m", "rlhf push"):
        with pytest.raises(Exception, match="(?i)no such|missing|usage"):
            parses(wrong)


def commands_of(lines: list[str]) -> list[str]:
    return [line.removeprefix("next:").strip() for line in lines if line.startswith(("next:", "      "))]


def test_every_training_command_has_follow_ups():
    kinds = config_kinds(ROOT) - NOT_TRAINING
    assert {"sft", "dpo", "rm", "grpo", "ppo"} <= kinds
    assert kinds - {"best-of-n"} <= set(FOLLOW_UPS), kinds - set(FOLLOW_UPS)


@pytest.mark.parametrize("kind", sorted(FOLLOW_UPS))
def test_a_finished_run_names_its_model_and_next_commands_that_parse(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("runs/sft/final").mkdir(parents=True)
    run = Path("runs") / kind
    (run / "final").mkdir(parents=True, exist_ok=True)
    lines = run_outputs(SimpleNamespace(kind=kind, model="runs/sft/final", output_dir=str(run)))
    assert lines[0] == {"rm": "reward model", "prm": "process reward model"}.get(kind, "model") + f": {run}/final"
    commands = commands_of(lines)
    assert len(commands) == len(lines) - 1 >= 2
    assert commands[-1] == f"rlhf push {run} --to DIR"
    for command in commands:
        parses(command)
    assert any(f"--model {run}/final" in c or f"prm:{run}/final" in c for c in commands)


HUB = "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.mark.parametrize(("kind", "expected"), [
    ("sft", ["rlhf dpo --model runs/x/final --train-data PAIRS",
             f"rlhf eval --model runs/x/final --reference {HUB}", "rlhf push runs/x --to DIR"]),
    ("rm", ["rlhf rm eval --model runs/x/final --data HELD_OUT_PAIRS",
            "rlhf ppo --model POLICY --prompts PROMPTS --reward rm:runs/x/final", "rlhf push runs/x --to DIR"]),
    ("dpo", [f"rlhf eval --model runs/x/final --reference {HUB}", "rlhf push runs/x --to DIR"]),
    ("grpo", [f"rlhf eval --model runs/x/final --reference {HUB}", "rlhf push runs/x --to DIR"]),
])
def test_the_commands_after_each_recipe(kind, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SimpleNamespace(kind=kind, model=HUB, output_dir="runs/x")
    assert run_outputs(cfg) == []  # no final model (a run that stopped early): nothing to name
    Path("runs/x/final").mkdir(parents=True)
    assert commands_of(run_outputs(cfg)) == expected


def test_an_adapter_and_a_local_policy_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("runs/sft/final").mkdir(parents=True)
    Path("runs/rm/final").mkdir(parents=True)
    Path("runs/rm/final-adapter").mkdir()
    lines = run_outputs(SimpleNamespace(kind="rm", model="runs/sft/final", output_dir="runs/rm"))
    assert lines[0] == "reward model: runs/rm/final (adapter: runs/rm/final-adapter)"
    assert "rlhf ppo --model runs/sft/final --prompts PROMPTS --reward rm:runs/rm/final" in commands_of(lines)


def test_paths_with_spaces_are_quoted_so_the_commands_run_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Path("my runs/sft")
    (run / "final").mkdir(parents=True)
    commands = commands_of(run_outputs(SimpleNamespace(kind="sft", model="my model", output_dir=str(run))))
    assert shlex.split(commands[0])[:3] == ["rlhf", "dpo", "--model"]
    assert shlex.split(commands[0])[3] == "my runs/sft/final"
    assert shlex.split(commands[-1])[2] == "my runs/sft"
    for command in commands:
        parses(command)


def test_best_of_n_names_its_data_and_sft_on_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SimpleNamespace(kind="best-of-n", model="runs/sft/final", out="best_of_n.jsonl")
    assert run_outputs(cfg) == []
    Path("best_of_n.jsonl").write_text("{}\n")
    lines = run_outputs(cfg)
    assert lines == ["data: best_of_n.jsonl",
                     "next: rlhf sft --model runs/sft/final --train-data best_of_n.jsonl"]
    parses(lines[1].removeprefix("next:"))


def test_only_the_main_process_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("runs/sft/final").mkdir(parents=True)
    cfg = SimpleNamespace(kind="sft", model="tiny", output_dir="runs/sft")
    monkeypatch.setenv("RANK", "1")
    print_run_outputs(cfg)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    print_run_outputs(cfg)
    assert capsys.readouterr().out.splitlines() == run_outputs(cfg)


@dataclass(frozen=True)
class FakeSFTConfig(Config):
    kind = "sft"
    model: str = param("tiny", "model")
    output_dir: str = param("runs/sft", "run folder")


def test_config_commands_end_with_the_lines_on_every_run(tmp_path, monkeypatch):
    """The lines come from `config_command` itself, for every command it makes, and from the run
    folder: a rerun that trains nothing prints them too."""
    monkeypatch.chdir(tmp_path)
    toy = typer.Typer()
    trained = []

    @toy.callback()
    def main():
        """A group."""

    def train(cfg):
        if not Path(cfg.output_dir, "final").exists():
            Path(cfg.output_dir, "final").mkdir(parents=True)
            trained.append(cfg.output_dir)
        print("training done")

    config_command(toy, "sft", FakeSFTConfig, train, help="Train.", examples="")
    first = runner.invoke(toy, ["sft"])
    again = runner.invoke(toy, ["sft"])
    assert first.exit_code == again.exit_code == 0, first.output
    assert trained == ["runs/sft"]
    expected = ["training done", *run_outputs(FakeSFTConfig())]
    assert first.output.splitlines() == again.output.splitlines() == expected
    assert expected[1] == "model: runs/sft/final"
