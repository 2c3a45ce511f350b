"""Claims are leases: a GET never claims, a claim expires and its item goes to the next
annotator, an admin releases claims (page and CLI), and an old database gets leases."""

from __future__ import annotations

import os
import re
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select, text, update
from typer.testing import CliRunner

from rlhfkit.feedback.assignment import next_assignment
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.models import Assignment, Item, Project, User, Vote, utcnow

sqlite_only = pytest.mark.skipif(bool(os.environ.get("RLHFKIT_TEST_DATABASE_URL")), reason="reads SQLite's schema")
ONE_ITEM = [{"id": "only", "prompt": "2+2?", "responses": ["4", "5"]}]
ITEM_URL = re.compile(r"/p/\d+/items/(\d+)")


def count(database, model) -> int:
    with database.read() as session:
        return session.scalar(select(func.count()).select_from(model))


def post_claim(client, project_id):
    token = client.get("/api/me").json()["csrf_token"]
    return client.post(f"/p/{project_id}/label", data={"csrf_token": token})


def expire_claims(database) -> None:
    with database.write() as session:
        session.execute(update(Assignment).where(Assignment.lease_expires_at.is_not(None))
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()


def vote(client, project_id, item_id):
    token = client.get("/api/me").json()["csrf_token"]
    return client.post(f"/p/{project_id}/items/{item_id}", data={"csrf_token": token, "choice": "A"})


def test_get_requests_never_claim_an_item(app, seeded, login):
    pid = seeded.project_id
    client = login(app, "ann1")
    # what a link, a prefetch or another site's <img src> would do
    for path in [f"/p/{pid}/label", "/projects", f"/p/{pid}/history", f"/p/{pid}/guidelines"]:
        assert client.get(path).status_code == 200, path
    assert count(seeded.database, Assignment) == 0
    start = client.get(f"/p/{pid}/label").text
    assert f'action="/p/{pid}/label"' in start and 'method="post"' in start  # a button that claims
    assert client.get(f"/api/p/{pid}/next").status_code == 405


def test_claiming_is_a_csrf_protected_post(app, seeded, login, api_headers):
    pid = seeded.project_id
    client = login(app, "ann1")
    assert client.post(f"/p/{pid}/label").status_code == 403
    assert client.post(f"/api/p/{pid}/next").status_code == 403
    assert count(seeded.database, Assignment) == 0
    response = post_claim(client, pid)
    assert response.status_code == 303 and ITEM_URL.fullmatch(response.headers["location"])
    item = client.post(f"/api/p/{pid}/next", headers=api_headers(client)).json()["item"]
    assert f"/items/{item['item_id']}" in response.headers["location"]  # the held item again
    assert item["claim_expires_at"] is not None
    # the labeling page now goes straight to the held item
    assert client.get(f"/p/{pid}/label").headers["location"] == response.headers["location"]
    assert count(seeded.database, Assignment) == 1


def test_an_expired_claim_goes_to_the_next_annotator(app, database, seed, login):
    pid = seed(database, records=ONE_ITEM, overlap=1)
    ann1, ann2 = login(app, "ann1"), login(app, "ann2")
    item_id = int(ITEM_URL.fullmatch(post_claim(ann1, pid).headers["location"]).group(1))
    assert post_claim(ann2, pid).headers["location"] == f"/p/{pid}/label"
    assert "Nothing left to label" in ann2.get(f"/p/{pid}/label").text  # held by ann1: counts against overlap

    expire_claims(database)
    assert "Start labeling" in ann2.get(f"/p/{pid}/label").text  # offered again
    assert post_claim(ann2, pid).headers["location"] == f"/p/{pid}/items/{item_id}"
    assert vote(ann2, pid, item_id).status_code == 303
    # ann1 comes back to the page they left open: the item is taken, their claim is gone
    late = vote(ann1, pid, item_id)
    assert late.status_code == 409 and "expired" in late.text
    with database.read() as session:
        assert [v.user.username for v in session.scalars(select(Vote))] == ["ann2"]
        assert session.scalar(select(func.count(Assignment.id)).where(Assignment.user.has(username="ann1"))) == 0


def test_an_expired_claim_can_still_be_answered_while_the_item_has_room(app, database, seed, login, api_headers):
    pid = seed(database, records=ONE_ITEM, overlap=1)
    ann1 = login(app, "ann1")
    item = ann1.post(f"/api/p/{pid}/next", headers=api_headers(ann1)).json()["item"]
    expire_claims(database)
    response = ann1.post(f"/api/p/{pid}/items/{item['item_id']}/vote", json={"choice": "A"},
                         headers=api_headers(ann1))
    assert response.status_code == 200
    with database.read() as session:
        (assignment,) = session.scalars(select(Assignment))
        assert assignment.lease_expires_at is None  # answered: held for good


def test_undo_claims_the_item_anew(app, database, seed, login, api_headers):
    pid = seed(database, records=ONE_ITEM, overlap=1)
    ann1, ann2 = login(app, "ann1"), login(app, "ann2")
    item = ann1.post(f"/api/p/{pid}/next", headers=api_headers(ann1)).json()["item"]
    ann1.post(f"/api/p/{pid}/items/{item['item_id']}/vote", json={"choice": "A"}, headers=api_headers(ann1))
    assert ann1.post(f"/api/p/{pid}/undo", headers=api_headers(ann1)).json() == {"undone_item_id": item["item_id"]}
    assert ann2.post(f"/api/p/{pid}/next", headers=api_headers(ann2)).json() == {"item": None}


def test_admin_releases_claims_on_the_dashboard_and_from_the_cli(app, database, seed, login, csrf, tmp_path):
    pid = seed(database, records=ONE_ITEM, overlap=1)
    ann1, ann2, admin = login(app, "ann1"), login(app, "ann2"), login(app, "admin")
    post_claim(ann1, pid)
    dashboard = admin.get(f"/admin/p/{pid}").text
    assert "1 item claimed and unanswered" in dashboard
    token = csrf(dashboard)
    assert admin.post(f"/admin/p/{pid}/release", data={"csrf_token": token, "username": "nobody"}).status_code == 400
    assert admin.post(f"/admin/p/{pid}/release", data={"csrf_token": token, "username": "ANN1"}).status_code == 303
    assert "0 items claimed and unanswered; 1 expired claim" in " ".join(admin.get(f"/admin/p/{pid}").text.split())
    assert ITEM_URL.fullmatch(post_claim(ann2, pid).headers["location"])  # ann2 has it now
    # annotators cannot release
    assert ann1.post(f"/admin/p/{pid}/release",
                     data={"csrf_token": ann1.get("/api/me").json()["csrf_token"]}).status_code == 403

    from rlhfkit.cli.label import label_app

    url = database.engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(label_app, ["release", "--project", "demo", "--db", url])
    assert result.exit_code == 0 and "released 1 claim in 'demo'" in result.output, result.output
    result = CliRunner().invoke(label_app, ["release", "--project", "demo", "--annotator", "ghost", "--db", url])
    assert result.exit_code == 2 and "no account named 'ghost'" in result.output


def test_serve_takes_the_claim_lease(monkeypatch, tmp_path):
    import uvicorn

    from rlhfkit.cli.label import label_app

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    result = CliRunner().invoke(label_app, ["serve", "--db", str(tmp_path / "f.db"), "--claim-lease-minutes", "5"])
    assert result.exit_code == 0, result.output
    assert served["app"].state.claim_lease == timedelta(minutes=5)


@pytest.mark.skipif(bool(os.environ.get("RLHFKIT_TEST_DATABASE_URL")), reason="builds a SQLite file by hand")
def test_a_schema_1_database_upgrades_with_leases_and_username_keys(tmp_path, login):
    from rlhfkit.feedback.app import create_app
    from rlhfkit.feedback.models import ANNOTATOR
    from rlhfkit.feedback.projects import add_round, create_project
    from rlhfkit.feedback.users import create_user

    path = tmp_path / "old.db"
    database = open_database(str(path))
    with database.write() as session:
        bob = create_user(session, "Bob", "correct horse battery", ANNOTATOR)
        ann = create_user(session, "ann", "correct horse battery", ANNOTATOR)
        project = create_project(session, "demo", overlap=1)
        add_round(session, project, ONE_ITEM + [{"prompt": "3+3?", "responses": ["6", "7"]}])
        session.commit()
        ids = {"bob": bob.id, "ann": ann.id, "project": project.id}
    database.close()
    # Make it look like schema version 1: no leases, no username keys, a second "bob".
    with open_database(str(path), upgrade=False).engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_users_username_key"))
        conn.execute(text("ALTER TABLE users DROP COLUMN username_key"))
        conn.execute(text("ALTER TABLE assignments DROP COLUMN lease_expires_at"))
        conn.execute(text("UPDATE schema_version SET version = 1"))
        conn.execute(text("INSERT INTO users (username, password_hash, role, active, created_at) "
                          "SELECT 'bob', password_hash, role, 1, created_at FROM users WHERE id = :id"),
                     {"id": ids["bob"]})
        for user, item in ((ids["bob"], 1), (ids["ann"], 2)):
            conn.execute(text("INSERT INTO assignments (item_id, user_id, project_id, display_order, created_at) "
                              "VALUES (:item, :user, :project, '[0, 1]', '2024-01-01 00:00:00')"),
                         {"item": item, "user": user, "project": ids["project"]})
        conn.execute(text("INSERT INTO votes (item_id, user_id, project_id, ranks, both_bad, display_order, "
                          "created_at, updated_at, sequence) VALUES (2, :user, :project, '[0, 1]', 0, '[0, 1]', "
                          "'2024-01-01', '2024-01-01', 1)"), {"user": ids["ann"], "project": ids["project"]})

    database = open_database(str(path))  # upgrades
    with database.read() as session:
        keys = dict(session.execute(select(User.username, User.username_key)).all())
        assert keys == {"Bob": "bob", "ann": "ann", "bob": f"bob#{ids['bob'] + 2}"}
        leases = {a.item_id: a.lease_expires_at for a in session.scalars(select(Assignment))}
        assert leases[2] is None and leases[1] is not None  # answered: no lease; the old claim: expired
    app = create_app(database)
    for name in ("Bob", "bob", "ann"):  # every account still logs in by its exact name
        assert login(app, name).get("/api/me").json()["username"] == name
    bob2 = login(app, "bob")
    token = bob2.get("/api/me").json()["csrf_token"]
    assert bob2.post(f"/p/{ids['project']}/label", data={"csrf_token": token}).headers["location"] \
        == f"/p/{ids['project']}/items/1"  # Bob's claim from before the upgrade has expired
    database.close()


def _claim_queries(database, project_id: int, username: str) -> tuple[list[str], int | None]:
    """The SQL a claim runs to find the next item, and the position it finds."""
    statements: list[str] = []

    def spy(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    with database.write() as session:
        event.listen(session.connection(), "before_cursor_execute", spy)
        project = session.get(Project, project_id)
        user = session.scalar(select(User).where(User.username == username))
        assignment = next_assignment(session, project, user)
        event.remove(session.connection(), "before_cursor_execute", spy)
        position = None if assignment is None else assignment.item.position
        session.rollback()
    return statements, position


@sqlite_only
def test_the_next_item_is_found_walking_the_round_in_order_not_by_sorting_the_project(database, seed):
    """A claim used to test every item of the project and sort them (≈ 11 ms at 20k items,
    under the write lock); now it walks each round's items along (round_id, position) and
    stops at the first with room."""
    project_id = seed(database, overlap=1, records=[{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(30)])
    with database.write() as session:  # ann1 holds the first 3 items for good (answered: no lease)
        ann1 = session.scalar(select(User).where(User.username == "ann1"))
        for item in session.scalars(select(Item).where(Item.project_id == project_id).order_by(Item.position)
                                    .limit(3)):
            session.add(Assignment(item_id=item.id, user_id=ann1.id, project_id=project_id, display_order=[0, 1],
                                   lease_expires_at=None))
        session.commit()
    statements, position = _claim_queries(database, project_id, "ann2")
    assert position == 3
    (finder, parameters), = [(s, p) for s, p in statements if "FROM items" in s and "ORDER BY items.position" in s]
    with database.read() as session:
        plan = " | ".join(row[-1] for row in session.connection().exec_driver_sql(
            f"EXPLAIN QUERY PLAN {finder}", parameters))
    assert "ix_items_round_position" in plan and "TEMP B-TREE" not in plan, plan


@sqlite_only
def test_the_upgrade_to_schema_6_adds_the_round_order_index(tmp_path):
    path = tmp_path / "v5.db"
    open_database(str(path)).close()
    with open_database(str(path), upgrade=False).engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_items_round_position"))
        conn.execute(text("UPDATE schema_version SET version = 5"))
    database = open_database(str(path))
    with database.engine.connect() as conn:
        indexes = {row[0] for row in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'index'"))}
        assert conn.execute(text("SELECT version FROM schema_version")).scalar_one() == 6
    database.close()
    assert "ix_items_round_position" in indexes
