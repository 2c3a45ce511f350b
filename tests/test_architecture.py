"""The house rules CI enforces: the import layers (import-linter) and the linter (ruff).

Both read their rules from pyproject.toml; these tests only run them, so the rules live in
one place and `lint-imports` / `ruff check` by hand give the same verdict.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; `bash scripts/setup.sh test` installs it")
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_import_points_down_the_layers():
    result = _run(_tool("lint-imports"), "--no-cache", "--no-logo")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_ruff_finds_nothing():
    result = _run(_tool("ruff"), "check", "--no-cache", "src", "tests", "bench", "experiments", "scripts")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
