"""`rlhf label ...` commands through typer's runner."""

import json

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from rlhfkit.cli.label import label_app
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.models import Project, Round, User

runner = CliRunner()


def run(*args):
    return runner.invoke(label_app, [str(a) for a in args])


@pytest.mark.parametrize("command", ["serve", "create-admin", "add-annotator", "import", "export", "release"])
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and "rlhf label" in result.output


def test_accounts_import_and_export(tmp_path):
    db = tmp_path / "f.db"
    candidates = tmp_path / "c.jsonl"
    candidates.write_text(
        json.dumps({"prompt": "p1", "responses": ["a", "b"]}) + "\n"
        + json.dumps({"prompt": "p2", "responses": ["a", "b", "c"], "gold": 2}) + "\n")
    good = "velvet otter 42"
    assert run("create-admin", "root", "--password", good, "--db", db).exit_code == 0
    assert run("add-annotator", "ann", "--password", good, "--db", db).exit_code == 0
    taken = run("add-annotator", "ANN", "--password", good, "--db", db)
    assert taken.exit_code == 2 and "taken" in taken.output
    for weak, why in [("short", "10 to 1024"), ("password123", "common"), ("bob-the-bobcat", "username")]:
        result = run("add-annotator", "bob", "--password", weak, "--db", db)
        assert result.exit_code == 2 and why in result.output, (weak, result.output)

    first = run("import", candidates, "--project", "helpful", "--model-version", "sft-v1", "--overlap", "3",
                "--db", db)
    assert first.exit_code == 0, first.output
    assert "created project 'helpful' (overlap 3)" in first.output and "round 1: 2 items" in first.output
    second = run("import", candidates, "--project", "helpful", "--db", db)
    assert "round 2" in second.output and "created" not in second.output

    database = open_database(str(db))
    with database.read() as session:
        assert {u.username: u.role for u in session.scalars(select(User))} == {"root": "admin", "ann": "annotator"}
        project = session.scalar(select(Project))
        assert project.overlap == 3
        assert [(r.number, r.model_version) for r in session.scalars(select(Round))] == [(1, "sft-v1"), (2, None)]
    database.close()

    out = tmp_path / "pairs.jsonl"
    exported = run("export", out, "--project", "helpful", "--format", "soft", "--db", db)
    assert exported.exit_code == 0 and "wrote 0 soft records" in exported.output
    assert out.read_text() == ""
    assert run("export", out, "--project", "nope", "--db", db).exit_code == 2
    assert run("export", out, "--project", "helpful", "--format", "csv", "--db", db).exit_code == 2


def test_import_reports_the_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n"
                   + json.dumps({"prompt": "p", "responses": ["a", "b"], "gold": 5}) + "\n")
    result = run("import", bad, "--project", "x", "--db", tmp_path / "f.db")
    assert result.exit_code == 2
    assert f"{bad}:2: field 'gold'" in result.output
    database = open_database(str(tmp_path / "f.db"))
    with database.read() as session:
        assert session.scalar(select(Project)) is None  # nothing half-imported
    database.close()
