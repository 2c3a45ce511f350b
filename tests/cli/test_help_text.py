"""`--help` prose reflows to the terminal, and a closed pipe ends a command quietly."""

from __future__ import annotations

import subprocess
import sys

from rlhfkit.cli.help_format import reflow_help


def test_prose_paragraphs_are_joined_and_lists_kept():
    text = """First line
    of the summary.

    A paragraph wrapped
    at 100 columns in the source.

    - a bullet
    - another bullet

    Example:
      rlhf demo --full
    """
    assert reflow_help(text) == ("First line of the summary.\n\nA paragraph wrapped at 100 columns in the source.\n\n"
                                 "- a bullet\n- another bullet\n\nExample:\n  rlhf demo --full")
    assert reflow_help(None) is None and reflow_help("") == ""


def test_help_of_a_command_reads_as_prose_at_80_columns():
    out = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "demo", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"}, timeout=60).stdout
    lines = [line.strip() for line in out.splitlines()]
    # the docstring's own line breaks (at ~100 columns) no longer leave short ragged lines
    at = lines.index("Stages: demo tasks → SFT → the loop from the SFT model: each round samples")
    assert lines[at + 1] == "from the newest policy, labels pairs with the exact checkers acting as an"


def test_a_closed_pipe_ends_help_without_an_error_line():
    run = subprocess.run(f"{sys.executable} -m rlhfkit.cli demo --help | head -1", shell=True, capture_output=True,
                         text=True, timeout=60)
    assert "error" not in run.stderr.lower(), run.stderr
