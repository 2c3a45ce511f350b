"""`rlhf` imports a command's module only when the command runs (cli/lazy.py): the map from
command to module is complete, and `rlhf label ...` starts without torch or transformers."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import RlhfGroup, app
from rlhfkit.cli.lazy import module_commands


def test_every_registered_command_is_in_the_map_under_its_own_module():
    for module in set(RlhfGroup.modules.values()):
        for name in module_commands(module):
            assert RlhfGroup.modules.get(name) == module, f"rlhfkit.cli.{module} registers {name!r}: map it"


def test_help_lists_the_commands_in_the_maps_order():
    out = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(app, ["--help"]).output
    listed = [line.strip("│ ").split()[0] for line in out.splitlines()
              if line.startswith("│ ") and line.strip("│ ").split()[:1] and not line.strip("│ ").startswith("-")]
    assert [name for name in listed if name in RlhfGroup.modules] == list(RlhfGroup.modules)


@pytest.mark.parametrize("args", [["label", "--help"], ["label", "export", "--help"],
                                  ["label", "audit", "--db", "missing.db"]])
def test_label_commands_start_without_torch(tmp_path, args):
    code = ("import sys\nfrom rlhfkit.cli import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_an_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(app, ["labl"])
    assert result.exit_code == 2 and "No such command" in result.output
