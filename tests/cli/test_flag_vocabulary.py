"""One flag vocabulary (docs/CLI.md): a renamed flag or YAML key keeps its old name for one
release — hidden from `--help`, accepted with one `warning:` line, an error together with the
new name — and an on/off flag shows no `<bool>` in `--help`."""

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
from rlhfkit.cli.flags import old_flags
from rlhfkit.cli.help_format import App
from rlhfkit.cli.outputs import FOLLOW_UPS, run_outputs
from rlhfkit.config import Config, ConfigError, RenamedSetting, param

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})
ROOT = typer.main.get_command(app)


def lines(result) -> list[str]:
    return [line.strip() for line in result.output.splitlines() if line.strip()]


def help_flags(result) -> set[str]:
    """The flags `--help` lists (first words of the option rows)."""
    return {word for line in result.output.splitlines() for word in line.strip("│ ").split()[:2]
            if word.startswith("--")}


# ----------------------------------------------------------------------------- the mechanism, on toy commands
@dataclass(frozen=True)
class ToyConfig(Config):
    kind = "toy"
    samples_per_prompt: int = param(4, "responses per prompt", old_names=("group_size", "n"))
    lr: float = param(0.5, "peak learning rate")
    whiten: bool = param(True, "whiten the advantages", old_names=("normalize",))


@pytest.fixture
def toy():
    """invoke(*args) → (result, the ToyConfig the command ran with or None)."""
    cli = typer.Typer()
    seen: list[ToyConfig] = []

    @cli.callback()
    def main():
        """A group, so the command is called by its name."""

    config_command(cli, "toy", ToyConfig, seen.append, help="Toy.", examples="")
    return lambda *args: (runner.invoke(cli, ["toy", *map(str, args)]), seen[-1] if seen else None)


def test_the_new_flag_sets_the_field_silently(toy):
    result, cfg = toy("--samples-per-prompt", 8, "--no-whiten")
    assert result.exit_code == 0 and lines(result) == []
    assert cfg.samples_per_prompt == 8 and cfg.whiten is False


@pytest.mark.parametrize("old", ["--group-size", "--n"])
def test_an_old_flag_sets_the_field_with_one_warning_line(toy, old):
    result, cfg = toy(old, 8)
    assert result.exit_code == 0 and cfg.samples_per_prompt == 8
    assert lines(result) == [f"warning: {old} is now --samples-per-prompt; the old name goes in the next release"]


def test_an_old_on_off_flag_keeps_both_forms(toy):
    result, cfg = toy("--no-normalize")
    assert result.exit_code == 0 and cfg.whiten is False
    assert lines(result) == ["warning: --normalize is now --whiten; the old name goes in the next release"]


def test_old_and_new_flag_together_are_one_error_line(toy):
    result, cfg = toy("--group-size", 8, "--samples-per-prompt", 2)
    assert result.exit_code == 2 and cfg is None
    assert lines(result) == ["error: --group-size is the old name of --samples-per-prompt; give only "
                             "--samples-per-prompt"]


def test_help_shows_the_new_names_only(toy):
    result, _ = toy("--help")
    assert result.exit_code == 0
    assert {"--samples-per-prompt", "--whiten", "--lr"} <= help_flags(result)
    for old in ("--group-size", "--n", "--normalize", "--no-normalize"):
        assert old not in result.output.split()


def test_an_old_yaml_key_sets_the_field_with_a_warning(toy, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("group_size: 6\nlr: 0.25\n")
    result, cfg = toy("--config", path)
    assert result.exit_code == 0 and (cfg.samples_per_prompt, cfg.lr) == (6, 0.25)
    assert lines(result) == [f"warning: {path}: 'group_size' is now 'samples_per_prompt'; the old name goes in the "
                             "next release"]
    result, cfg = toy("--config", path, "--samples-per-prompt", 3)  # the flag still wins over the file
    assert result.exit_code == 0 and cfg.samples_per_prompt == 3


def test_an_old_and_a_new_yaml_key_together_are_one_error_line(toy, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("samples_per_prompt: 6\ngroup_size: 2\n")
    result, cfg = toy("--config", path)
    assert result.exit_code == 2 and cfg is None
    assert lines(result) == [f"error: {path}: 'group_size' is the old name of 'samples_per_prompt'; give only "
                             "'samples_per_prompt'"]


def test_the_library_warns_with_a_renamed_setting_and_saves_the_new_name(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("n: 5\n")
    with pytest.warns(RenamedSetting, match="'n' is now 'samples_per_prompt'"):
        cfg = ToyConfig.load(path)
    assert cfg.samples_per_prompt == 5 and "samples_per_prompt" in cfg.to_dict() and "n" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="'group_size' is the old name of 'samples_per_prompt'"):
        ToyConfig.from_dict({"group_size": 1, "n": 2})


@pytest.fixture
def handwritten():
    """A hand-written command with a required and an optional renamed option."""
    cli = App()
    seen: list[tuple] = []

    @cli.callback()
    def main():
        """A group."""

    @cli.command("pairs")
    @old_flags(data="--human", judge_template=("--template", "--prompt-file"))
    def pairs(data: Path = typer.Option(..., help="input pairs"),
              judge_template: str = typer.Option("pairwise", help="judge prompt"),
              both: bool = typer.Option(True, "--both/--one", help="both orders")):
        """Label pairs."""
        seen.append((data, judge_template, both))

    return lambda *args: (runner.invoke(cli, ["pairs", *map(str, args)]), seen[-1] if seen else None)


def test_a_hand_written_command_takes_the_new_and_the_old_names(handwritten):
    result, got = handwritten("--data", "a.jsonl", "--judge-template", "t.txt")
    assert result.exit_code == 0 and lines(result) == [] and got == (Path("a.jsonl"), "t.txt", True)
    result, got = handwritten("--human", "a.jsonl", "--prompt-file", "t.txt", "--one")
    assert result.exit_code == 0 and got == (Path("a.jsonl"), "t.txt", False)
    assert lines(result) == ["warning: --human is now --data; the old name goes in the next release",
                             "warning: --prompt-file is now --judge-template; the old name goes in the next release"]


@pytest.mark.parametrize("args, message", [
    (["--human", "a", "--data", "b"], "error: --human is the old name of --data; give only --data"),
    (["--data", "a", "--template", "x", "--judge-template", "y"],
     "error: --template is the old name of --judge-template; give only --judge-template"),
    (["--data", "a", "--template", "x", "--prompt-file", "y"],
     "error: --prompt-file is the old name of --judge-template; give only --judge-template"),
    (["--judge-template", "x"], "error: missing option --data"),
])
def test_a_hand_written_command_refuses_both_names_or_neither(handwritten, args, message):
    result, got = handwritten(*args)
    assert result.exit_code == 2 and got is None
    assert lines(result) == [message]


def test_a_hand_written_command_hides_the_old_names_and_keeps_required(handwritten):
    result, _ = handwritten("--help")
    assert {"--data", "--judge-template", "--both"} <= help_flags(result)
    for old in ("--human", "--template", "--prompt-file"):
        assert old not in result.output
    assert "input pairs (required)" in " ".join(result.output.split())


# ----------------------------------------------------------------------------- the real commands
# (command, old flag, new flag, a value): every old name docs/CLI.md lists as still accepted.
RENAMED = [
    ("dpo", "--gamma", "--simpo-margin", "0.5"),
    *[(c, "--group-size", "--samples-per-prompt", "2") for c in ("grpo", "rloo", "remax", "reinforce", "ppo",
                                                                 "online-dpo")],
    ("best-of-n", "--n", "--samples-per-prompt", "2"),
    ("expert-iter", "--n", "--samples-per-prompt", "2"),
    ("generate", "--n", "--samples-per-prompt", "2"),
    ("eval", "--n-samples", "--samples-per-prompt", "2"),
    ("judge pairs", "--template", "--judge-template", "t.txt"),
    ("judge agreement", "--template", "--judge-template", "t.txt"),
    ("judge agreement", "--human", "--data", "h.jsonl"),
    ("judge constitutional", "--out", "--output-dir", "runs/cai"),
    ("demo", "--out", "--output-dir", "runs/d"),
    ("loop run", "--out", "--output-dir", "runs/l"),
    ("loop run", "--rl-group-size", "--rl-samples-per-prompt", "2"),
    ("loop export", "--to", "--output-dir", "r2"),
]
REQUIRED = {"judge pairs": ["--data", "d.jsonl", "--out", "o.jsonl"], "judge constitutional": ["--prompts", "p.jsonl"],
            "loop export": ["runs/loop", "--round", "1"]}


def command(path: str):
    cmd = ROOT
    for name in path.split():
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("path, old, new, value", RENAMED, ids=[f"{r[0]} {r[1]}" for r in RENAMED])
def test_every_renamed_flag_is_hidden_and_still_parses(path, old, new, value):
    cmd = command(path)
    options = {opt: p for p in cmd.params for opt in getattr(p, "opts", ())}
    assert options[old].hidden and not options[new].hidden
    cmd.make_context(path, [*REQUIRED.get(path, []), old, value])  # a usage error raises
    shown = runner.invoke(app, [*path.split(), "--help"])
    assert new in help_flags(shown) and old not in help_flags(shown)


def test_the_real_commands_map_an_old_flag_onto_the_field():
    # checked before any model loads: the value reached the config under its new name
    result = runner.invoke(app, ["grpo", "--model", "tiny", "--tasks", "demo", "--group-size", "1"])
    assert result.exit_code == 2
    assert lines(result) == ["warning: --group-size is now --samples-per-prompt; the old name goes in the next "
                             "release", "error: command line: grpo needs samples_per_prompt ≥ 2"]
    result = runner.invoke(app, ["dpo", "--train-data", "p.jsonl", "--gamma", "0.5"])
    assert lines(result)[-1] == ("error: command line: 'simpo_margin' is not used by loss 'dpo' (its "
                                 "hyper-parameters: beta, label_smoothing)")


def every_command(group, prefix=""):
    for name, cmd in sorted(group.commands.items()):
        yield from every_command(cmd, f"{prefix}{name} ") if hasattr(cmd, "commands") else [f"{prefix}{name}"]


def test_no_flag_shows_a_type_in_help():
    groups = ["", *(name for name, cmd in ROOT.commands.items() if hasattr(cmd, "commands"))]
    for path in [*groups, *every_command(ROOT)]:
        result = runner.invoke(app, [*path.split(), "--help"])
        assert result.exit_code == 0, path
        assert "<bool>" not in result.output, path


def all_configs(cls=Config):
    for sub in cls.__subclasses__():
        yield sub
        yield from all_configs(sub)


def test_an_old_name_is_never_the_name_of_another_field():
    for cls in all_configs():
        clash = set(cls.old_names()) & set(cls.field_names())
        assert not clash, f"{cls.__name__}: {clash}"


def hidden_flags(line: str) -> list[str]:
    """The hidden (old) flags an `rlhf ...` command line uses."""
    words = shlex.split(line)
    cmd, i = ROOT, 1
    while hasattr(cmd, "commands") and i < len(words) and words[i] in cmd.commands:
        cmd, i = cmd.commands[words[i]], i + 1
    hidden = {opt for p in cmd.params if getattr(p, "hidden", False) for opt in (*p.opts, *p.secondary_opts)}
    return [w for w in words[i:] if w in hidden]


def test_no_example_or_suggested_command_uses_an_old_name(tmp_path, monkeypatch):
    lines = [part.strip() for path in every_command(ROOT) for text in [command(path).help or ""]
             for line in text.splitlines() for part in line.split("&&") if part.strip().startswith("rlhf ")]
    assert len(lines) > 40
    monkeypatch.chdir(tmp_path)
    for kind in FOLLOW_UPS:
        (tmp_path / "runs" / kind / "final").mkdir(parents=True)
        lines += [line.removeprefix("next:").strip() for line in
                  run_outputs(SimpleNamespace(kind=kind, model="m", output_dir=f"runs/{kind}"))[1:]]
    used = {line: hidden_flags(line) for line in lines if hidden_flags(line)}
    assert not used, used


def test_a_loop_folder_written_before_the_rename_resumes_quietly_as_the_same_loop(tmp_path, recwarn):
    from rlhfkit.loop.config import LoopConfig
    from rlhfkit.loop.runner import config_changes, load_config

    (tmp_path / "config.yaml").write_text(f"recipe: loop\nout: {tmp_path}\nrl_group_size: 2\nrounds: 3\n")
    cfg = load_config(tmp_path)  # its own record: no warning
    assert (cfg.output_dir, cfg.rl_samples_per_prompt, cfg.rounds) == (str(tmp_path), 2, 3)
    assert not [w for w in recwarn if issubclass(w.category, RenamedSetting)]
    saved = {("out" if k == "output_dir" else k): v for k, v in cfg.to_dict().items()}  # the registry's old copy
    assert config_changes(LoopConfig.current_names(saved, warn=False), cfg) == []
