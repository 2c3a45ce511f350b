"""Finding 7: per-project membership. A non-member annotator gets 404 everywhere a project
shows, members work, admins see all, and a schema-2 database keeps its projects open."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from rlhfkit.cli.label import label_app
from rlhfkit.feedback import membership
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.migrations import UPGRADES, migrate
from rlhfkit.feedback.models import Project


@pytest.fixture
def closed(database, seed):
    """Project 'demo' open to members only, with ann1 a member and ann2 not."""
    pid = seed(database, open_to_all=False)
    with database.write() as session:
        membership.add_members(session, session.get(Project, pid), ["ann1"])
        session.commit()
    return pid


def test_non_member_gets_404_on_pages_claim_and_vote_and_does_not_see_the_project(app, closed, login, api_headers):
    member, outsider = login(app, "ann1"), login(app, "ann2")
    item = member.post(f"/api/p/{closed}/next", headers=api_headers(member)).json()["item"]
    assert item is not None
    headers = api_headers(outsider)
    for method, path in [("GET", f"/p/{closed}/label"), ("GET", f"/p/{closed}/guidelines"),
                         ("GET", f"/p/{closed}/history"), ("POST", f"/p/{closed}/label"),
                         ("POST", f"/api/p/{closed}/next"), ("POST", f"/api/p/{closed}/undo")]:
        assert outsider.request(method, path, headers=headers).status_code == 404, path
    vote = outsider.post(f"/api/p/{closed}/items/{item['item_id']}/vote", json={"choice": "A"}, headers=headers)
    assert vote.status_code == 404 and vote.json()["detail"] == "no such project"
    assert outsider.get(f"/p/{10**6}/label").text.count("no such project") == \
        outsider.get(f"/p/{closed}/label").text.count("no such project")          # same as no project at all
    assert "demo" not in outsider.get("/projects").text
    assert "demo" in member.get("/projects").text
    response = member.post(f"/api/p/{closed}/items/{item['item_id']}/vote", json={"choice": "A"},
                           headers=api_headers(member))
    assert response.status_code == 200


def test_admin_sees_all_and_removed_member_loses_access(app, closed, login, database):
    admin = login(app, "admin")
    assert "demo" in admin.get("/projects").text and admin.get(f"/p/{closed}/label").status_code == 200
    with database.write() as session:
        membership.remove_members(session, session.get(Project, closed), ["ann1"])
        session.commit()
    assert login(app, "ann1").get(f"/p/{closed}/label").status_code == 404


def test_cli_members_and_one_line_errors(app, closed, login, database):
    db = str(database.engine.url).removeprefix("sqlite:///")
    if os.environ.get("RLHFKIT_TEST_DATABASE_URL"):
        db = os.environ["RLHFKIT_TEST_DATABASE_URL"]

    def run(*args):
        return CliRunner().invoke(label_app, ["members", "--project", "demo", *args, "--db", db])

    shown = run()
    assert shown.exit_code == 0 and "'demo': members only: ann1" in shown.output
    assert "members only: ann1, ann2" in run("--add", "ann2").output
    assert login(app, "ann2").get(f"/p/{closed}/label").status_code == 200
    assert "members only: ann1" in run("--remove", "ann2").output
    assert "open to all annotators (members: ann1)" in run("--open").output
    assert login(app, "ann2").get(f"/p/{closed}/label").status_code == 200
    for args, message in [(["--add", "zed"], "no account named 'zed'"), (["--add", "admin"], "admins see every")]:
        bad = run(*args)
        lines = [line for line in bad.output.splitlines() if line.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and message in lines[0], bad.output
    unknown = CliRunner().invoke(label_app, ["members", "--project", "nope", "--db", db])
    assert unknown.exit_code == 2 and "no project named 'nope'" in unknown.output


@pytest.mark.skipif(bool(os.environ.get("RLHFKIT_TEST_DATABASE_URL")), reason="builds a SQLite file by hand")
def test_a_schema_2_database_keeps_its_projects_open_to_every_annotator(tmp_path, seed, login):
    path = tmp_path / "v2.db"
    database = open_database(str(path))
    pid = seed(database, open_to_all=False)
    database.close()
    with open_database(str(path), upgrade=False).engine.begin() as conn:  # undo schema 3 by hand
        conn.execute(text("DROP TABLE project_members"))
        conn.execute(text("ALTER TABLE projects DROP COLUMN open_to_all"))
        for index in ("ix_login_sessions_last_seen_at", "ix_login_sessions_expires_at"):
            conn.execute(text(f"DROP INDEX {index}"))
        conn.execute(text("ALTER TABLE login_sessions DROP COLUMN last_seen_at"))
        conn.execute(text("UPDATE schema_version SET version = 2"))
    database = open_database(str(path), upgrade=False)
    assert migrate(database.engine, upgrades={3: UPGRADES[3]}, latest=3) == 3
    app = create_app(database)
    for name in ("ann1", "ann2"):
        client = login(app, name)
        assert "demo" in client.get("/projects").text
        token = client.get("/api/me").json()["csrf_token"]
        assert client.post(f"/api/p/{pid}/next", headers={"X-CSRF-Token": token}).json()["item"] is not None
    database.close()
