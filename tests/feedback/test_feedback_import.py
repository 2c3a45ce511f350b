"""Issue #16, findings 4, 8 and 9: every bad import file is one line naming file, line and
field, on the CLI and on the admin upload page; ids are unique per project; the export's
`item_id` names one item and carries the item's `meta`."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from rlhfkit.cli import app as rlhf_app
from rlhfkit.data.errors import DataError
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.export import export_records
from rlhfkit.feedback.models import ADMIN, Item, Round, Vote
from rlhfkit.feedback.projects import add_round, create_project, find_project
from rlhfkit.feedback.users import create_user

GOOD = json.dumps({"id": "a", "prompt": "p", "responses": ["x", "y"]}).encode() + b"\n"


def _line(record: dict) -> bytes:
    return json.dumps(record).encode() + b"\n"


def _nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


# (file bytes, what the one error line must contain: file:line and the problem)
BAD_FILES = {
    "utf16-bom": ('{"prompt": "p", "responses": ["x", "y"]}\n'.encode("utf-16"), ":1: the file is UTF-16"),
    "utf16-no-bom": ('{"prompt": "p", "responses": ["x", "y"]}\n'.encode("utf-16-le"), ":1: NUL bytes"),
    "latin1": (GOOD + '{"prompt": "café", "responses": ["x", "y"]}\n'.encode("latin-1"),
               ":2: not UTF-8 text (byte 0xe9"),
    "deep-json": (GOOD + b'{"prompt": "p", "responses": ["x", "y"], "meta": ' + b"[" * 100_000
                  + b"]" * 100_000 + b"}\n", ":2: JSON nested deeper than 20 levels"),
    "deep-meta": (GOOD + _line({"prompt": "p", "responses": ["x", "y"], "meta": {"a": _nested(20)}}),
                  ":2: field 'meta': nested deeper than 20 levels"),
    "duplicate-id": (GOOD + _line({"id": "b", "prompt": "q", "responses": ["x", "y"]})
                     + _line({"id": "a", "prompt": "r", "responses": ["x", "y"]}),
                     ":3: field 'id': duplicate id 'a' (line 1 has it too)"),
    "duplicate-int-id": (_line({"id": 7, "prompt": "p", "responses": ["x", "y"]})
                         + _line({"id": "7", "prompt": "q", "responses": ["x", "y"]}),
                         ":2: field 'id': duplicate id '7'"),
    "wrong-type": (GOOD + _line({"prompt": "p", "responses": ["x", "y"], "id": [1]}),
                   ":2: field 'id': expected text or an integer"),
    "reserved-id": (_line({"prompt": "p", "responses": ["x", "y"], "id": "#3"}), ":1: field 'id': expected 1 to 500"),
    "long-version": (_line({"prompt": "p", "responses": ["x", "y"], "model_version": "v" * 501}),
                     ":1: field 'model_version'"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_file_is_one_cli_error_line(tmp_path, name):
    data, expected = BAD_FILES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    result = CliRunner().invoke(rlhf_app, ["label", "import", str(path), "--project", "p",
                                           "--db", str(tmp_path / "f.db")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output
    assert f"{path}{expected}" in errors[0], errors[0]
    database = open_database(str(tmp_path / "f.db"))
    with database.read() as session:
        assert session.scalar(select(func.count(Item.id))) == 0
    database.close()


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_file_is_one_line_on_the_admin_upload_page(app, seeded, login, csrf, name):
    data, expected = BAD_FILES[name]
    admin = login(app, "admin")
    token = csrf(admin.get("/admin").text)
    response = admin.post(f"/admin/p/{seeded.project_id}/rounds", data={"csrf_token": token},
                          files={"file": ("up.jsonl", data, "application/json")})
    assert response.status_code == 400
    escaped = expected.replace("'", "&#39;")
    assert f"up.jsonl{escaped}" in response.text
    created = admin.post("/admin/projects", data={"csrf_token": token, "name": f"new {name}", "overlap": "1"},
                         files={"file": ("up.jsonl", data, "application/json")})
    assert created.status_code == 400 and f"up.jsonl{escaped}" in created.text
    with seeded.database.read() as session:
        assert find_project(session, f"new {name}") is None
        assert session.scalar(select(func.count(Round.id))) == 1


def test_an_id_of_an_earlier_round_is_refused_naming_the_round(tmp_path):
    db = str(tmp_path / "f.db")
    first, second = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    first.write_bytes(GOOD)
    second.write_bytes(_line({"id": "b", "prompt": "q", "responses": ["x", "y"]}) + b"\n" + GOOD)
    runner = CliRunner()
    assert runner.invoke(rlhf_app, ["label", "import", str(first), "--project", "p", "--db", db]).exit_code == 0
    result = runner.invoke(rlhf_app, ["label", "import", str(second), "--project", "p", "--db", db])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{second}:3: field 'id': id 'a' is already in round 1 of project 'p'" in result.output
    # another project may reuse the id
    assert runner.invoke(rlhf_app, ["label", "import", str(first), "--project", "q", "--db", db]).exit_code == 0


def test_add_round_refuses_repeated_ids(database):
    with database.write() as session:
        project = create_project(session, "p")
        add_round(session, project, [{"id": "a", "prompt": "p", "responses": ["x", "y"]}])
        with pytest.raises(DataError, match="<records>:1: field 'id': id 'a' is already in round 1"):
            add_round(session, project, [{"id": "a", "prompt": "q", "responses": ["x", "y"]}])
        with pytest.raises(DataError, match="<records>:2: field 'id': duplicate id 'b' \\(line 1"):
            add_round(session, project, [{"id": "b", "prompt": "q", "responses": ["x", "y"]},
                                         {"id": "b", "prompt": "r", "responses": ["x", "y"]}])


def test_export_item_ids_are_unique_and_carry_meta(tmp_path):
    """A database from before imports refused repeated ids (schema 4, no unique index) holds
    id 'a' on items of two rounds; the upgrade to 5 renames the later one `a#<row id>` and
    adds the unique index, so the export's item_id names one item."""
    path = tmp_path / "v4.db"
    database = open_database(str(path))
    with database.write() as session:
        user = create_user(session, "root", "correct horse battery", ADMIN)
        project = create_project(session, "p", overlap=1)
        add_round(session, project, [
            {"id": "a", "prompt": "p", "responses": ["x", "y"], "meta": {"source": "s1", "n": [1, 2]}},
            {"prompt": "q", "responses": ["x", "y"]}])
        session.commit()
        user_id, project_id = user.id, project.id
    database.close()
    with open_database(str(path), upgrade=False).engine.begin() as conn:
        conn.execute(text("DROP INDEX ux_items_project_external_id"))
        conn.execute(text("UPDATE schema_version SET version = 4"))
        conn.execute(text("INSERT INTO rounds (project_id, number, created_at) VALUES (:p, 2, '2026-01-01')"),
                     {"p": project_id})
        conn.execute(text("INSERT INTO items (round_id, project_id, position, external_id, prompt, responses, meta) "
                          "SELECT max(id), :p, 0, 'a', '\"old\"', '[\"x\", \"y\"]', '{}' FROM rounds"),
                     {"p": project_id})
    database = open_database(str(path))  # upgrades 4 -> 5
    with database.write() as session:
        for item in session.scalars(select(Item)):
            session.add(Vote(item_id=item.id, user_id=user_id, project_id=project_id, ranks=[0, 1],
                             display_order=[0, 1]))
        session.commit()
        items = {i.prompt: i for i in session.scalars(select(Item))}
        records = export_records(session, find_project(session, "p"), format="rankings")
    database.close()
    ids = {r["prompt"]: r["item_id"] for r in records}
    assert ids == {"p": "a", "q": f"#{items['q'].id}", "old": f"a#{items['old'].id}"}
    assert {r["prompt"]: r["item_meta"] for r in records}["p"] == {"source": "s1", "n": [1, 2]}
