"""The audit log (one row per admin action or export, in the action's transaction), vote
history (an edit or undo keeps the version it replaces) and the schema step that adds them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import select, text
from typer.testing import CliRunner

from rlhfkit.cli import app as cli_app
from rlhfkit.feedback import audit
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.export import export_records
from rlhfkit.feedback.models import AuditEntry, VoteHistory
from rlhfkit.feedback.projects import find_project
from rlhfkit.feedback.users import find_user

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
JSONL = b'{"prompt": "1+1?", "responses": ["2", "3"]}\n{"prompt": "2+2?", "responses": ["4", "5"]}\n'


def entries(database) -> list[AuditEntry]:
    with database.read() as session:
        return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def test_every_admin_page_action_writes_its_audit_row(database, seed, app, login, csrf):
    project_id = seed(database)
    admin = login(app, "admin")
    token = csrf(admin.get("/admin").text)
    assert admin.post("/admin/users", data={"username": "carol", "password": "another long secret",
                                            "role": "annotator", "csrf_token": token}).status_code == 303
    assert admin.post("/admin/projects", data={"name": "second", "overlap": "3", "csrf_token": token},
                      files={"file": ("r.jsonl", JSONL)}).status_code == 303
    assert admin.post(f"/admin/p/{project_id}/rounds", data={"csrf_token": token},
                      files={"file": ("r2.jsonl", JSONL)}).status_code == 303
    assert admin.post(f"/admin/p/{project_id}/settings", data={"overlap": "1", "guidelines": "be kind",
                                                               "csrf_token": token}).status_code == 303
    assert admin.post(f"/admin/p/{project_id}/release", data={"username": "", "csrf_token": token}).status_code == 303
    exported = admin.get(f"/admin/p/{project_id}/export?format=pairs")
    assert exported.status_code == 200

    with database.read() as session:
        admin_id = str(find_user(session, "admin").id)
    rows = [(e.actor, e.action, e.target, e.detail) for e in entries(database)]
    assert all(actor == admin_id for actor, *_ in rows)
    assert [(a, t) for _, a, t, _ in rows] == [
        ("user.create", "user:carol"), ("project.create", "project:second"), ("round.import", "project:second"),
        ("round.import", "project:demo"), ("project.settings", "project:demo"), ("claims.release", "project:demo"),
        ("export", "project:demo")]
    assert rows[0][3] == {"role": "annotator"}
    assert rows[2][3]["items"] == 2 and rows[3][3]["round"] == 2
    assert rows[4][3] == {"overlap": [2, 1], "guidelines_changed": True}
    assert rows[6][3]["rows"] == len(exported.text.splitlines()) and rows[6][3]["format"] == "pairs"


def test_a_refused_action_leaves_no_audit_row(database, seed, app, login, csrf):
    seed(database)
    admin = login(app, "admin")
    token = csrf(admin.get("/admin").text)
    response = admin.post("/admin/users", data={"username": "dave", "password": "short", "role": "annotator",
                                                "csrf_token": token})
    assert response.status_code == 400
    assert entries(database) == []  # the row went with the rolled-back transaction


def test_admin_page_shows_the_latest_entries_escaped(database, seed, app, login, csrf):
    seed(database)
    with database.write() as session:
        audit.record(session, audit.CLI, "project.create", "project:<script>alert(1)</script>", note="<b>x</b>")
        session.commit()
    page = login(app, "admin").get("/admin").text
    assert 'id="audit-log"' in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>x</b>" not in page


def test_cli_actions_are_audited_and_listed(tmp_path, monkeypatch):
    db = str(tmp_path / "f.db")
    records = tmp_path / "r.jsonl"
    records.write_bytes(JSONL)
    monkeypatch.setenv("RLHFKIT_PASSWORD", "correct horse battery")
    for args in (["create-admin", "alice"], ["add-annotator", "bob"],
                 ["import", str(records), "--project", "demo"], ["release", "--project", "demo"],
                 ["export", str(tmp_path / "o.jsonl"), "--project", "demo"]):
        result = runner.invoke(cli_app, ["label", *args, "--db", db])
        assert result.exit_code == 0, result.output
    result = runner.invoke(cli_app, ["label", "audit", "--json", "--db", db])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["action"] for r in rows] == ["user.create", "user.create", "project.create", "round.import",
                                           "claims.release", "export"]
    assert {r["actor"] for r in rows} == {"cli"}
    assert rows[3]["detail"]["items"] == 2 and rows[5]["detail"]["rows"] == 0
    table = runner.invoke(cli_app, ["label", "audit", "--limit", "2", "--since", "1h", "--db", db])
    assert table.exit_code == 0 and "claims.release" in table.output and "user.create" not in table.output
    future = runner.invoke(cli_app, ["label", "audit", "--since", "2999-01-01", "--db", db])
    assert "no audit entries" in future.output
    bad = runner.invoke(cli_app, ["label", "audit", "--since", "yesterday", "--db", db])
    assert bad.exit_code == 2 and "error: --since 'yesterday': not a time" in bad.output
    missing = runner.invoke(cli_app, ["label", "audit", "--db", str(tmp_path / "nope.db")])
    assert missing.exit_code == 2 and "nope.db: no such database file" in missing.output
    assert not (tmp_path / "nope.db").exists()


def _vote(client, headers, project_id, choice):
    item = client.post(f"/api/p/{project_id}/next", headers=headers).json()["item"]
    return client.post(f"/api/p/{project_id}/items/{item['item_id']}/vote", headers=headers,
                       json={"choice": choice, "rationale": f"said {choice}"}).json()


def test_editing_or_undoing_a_vote_keeps_the_old_version(database, seed, app, login, api_headers, csrf):
    project_id = seed(database, records=[{"prompt": "2+2?", "responses": ["4", "5"]}])
    ann = login(app, "ann1")
    headers = api_headers(ann)
    first = _vote(ann, headers, project_id, "A")
    before_edit = datetime.now(UTC)
    item_id = first["item_id"]
    edited = ann.post(f"/api/p/{project_id}/items/{item_id}/vote", headers=headers,
                      json={"choice": "B", "rationale": "changed my mind"}).json()
    assert edited["vote_id"] == first["vote_id"] and edited["ranks"] != first["ranks"]
    with database.read() as session:
        (old,) = session.scalars(select(VoteHistory))
        assert (old.vote_id, old.ranks, old.rationale, old.reason) == (first["vote_id"], first["ranks"],
                                                                       "said A", "edit")
        project = find_project(session, "demo")
        now = export_records(session, project, format="rankings")
        then = export_records(session, project, format="rankings", as_of=before_edit)
        earlier = export_records(session, project, format="rankings", as_of=datetime(2000, 1, 1, tzinfo=UTC))
    assert [r["ranks"] for r in now] == [edited["ranks"]] and [r["ranks"] for r in then] == [first["ranks"]]
    assert then[0]["rationale"] == "said A" and earlier == []

    before_undo = datetime.now(UTC)
    assert ann.post(f"/api/p/{project_id}/undo", headers=headers).json()["undone_item_id"] == item_id
    with database.read() as session:
        reasons = [v.reason for v in session.scalars(select(VoteHistory).order_by(VoteHistory.id))]
        project = find_project(session, "demo")
        assert export_records(session, project, format="rankings") == []
        (kept,) = export_records(session, project, format="rankings", as_of=before_undo)
    assert reasons == ["edit", "undo"] and kept["ranks"] == edited["ranks"]


def test_export_as_of_on_the_command_line(database, seed, app, login, api_headers, tmp_path):
    project_id = seed(database, records=[{"prompt": "2+2?", "responses": ["4", "5"]}])
    ann = login(app, "ann1")
    _vote(ann, api_headers(ann), project_id, "A")
    db = database.engine.url.render_as_string(hide_password=False)
    out = tmp_path / "o.jsonl"
    result = runner.invoke(cli_app, ["label", "export", str(out), "--project", "demo", "--as-of", "2000-01-01",
                                     "--db", db])
    assert result.exit_code == 0, result.output
    assert out.read_text() == ""
    bad = runner.invoke(cli_app, ["label", "export", str(out), "--project", "demo", "--as-of", "soon", "--db", db])
    assert bad.exit_code == 2 and "--as-of 'soon': not a time" in bad.output


def test_upgrade_from_version_3_adds_the_tables(tmp_path):
    path = tmp_path / "v3.db"
    database = open_database(str(path))
    database.close()
    with open_database(str(path), upgrade=False).engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_log"))
        conn.execute(text("DROP TABLE vote_history"))
        conn.execute(text("UPDATE schema_version SET version = 3"))
    database = open_database(str(path))  # upgrades 3 -> 4
    with database.write() as session:
        audit.record(session, audit.CLI, "backup", "file:x")
        session.commit()
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalar_one() >= 4
        assert conn.execute(text("SELECT count(*) FROM vote_history")).scalar_one() == 0
    assert [e.action for e in entries(database)] == ["backup"]
    database.close()
