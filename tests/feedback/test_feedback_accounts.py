"""Finding 6: account lifecycle (deactivate, activate, reset password, revoke sessions), the
idle timeout, and purging ended session rows."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from rlhfkit.cli.label import label_app
from rlhfkit.feedback import accounts, audit
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.export import export_records
from rlhfkit.feedback.models import LoginSession, Project, User, utcnow
from rlhfkit.feedback.users import IDLE_TIMEOUT, find_user, purge_expired_sessions

NEW_PASSWORD = "velvet otter 42"


def _sessions(database, username: str | None = None) -> int:
    with database.read() as session:
        query = select(func.count()).select_from(LoginSession)
        if username:
            query = query.join(User, LoginSession.user_id == User.id).where(User.username == username)
        return session.scalar(query)


def _change(database, fn):
    with database.write() as session:
        result = fn(session)
        session.commit()
        return result


def test_deactivated_user_is_logged_out_at_once_keeps_votes_and_can_be_reactivated(app, seeded, login, claim,
                                                                                   csrf):
    client = login(app, "ann1")
    page = claim(client, seeded.project_id).text
    client.post(f"/p/{seeded.project_id}/items/1", data={"csrf_token": csrf(page), "choice": "A"})
    assert client.get("/api/me").status_code == 200
    ended = _change(seeded.database, lambda s: accounts.deactivate(s, find_user(s, "ann1")))
    assert ended == 1 and _sessions(seeded.database, "ann1") == 0
    assert client.get("/api/me").status_code == 401                      # the live session stops now
    assert client.get("/projects").status_code == 303
    anon = TestClient(app, follow_redirects=False)
    token = csrf(anon.get("/login").text)
    refused = anon.post("/login", data={"username": "ann1", "password": "correct horse battery", "csrf_token": token})
    assert refused.status_code == 401
    with seeded.database.read() as session:                               # votes still export
        records = export_records(session, session.get(Project, seeded.project_id), format="pairs")
        assert [r["annotator"] for r in records] == ["ann1"]
    _change(seeded.database, lambda s: accounts.activate(s, find_user(s, "ann1")))
    assert login(app, "ann1").get("/api/me").status_code == 200


def test_reset_password_ends_sessions_and_the_old_password_fails(app, seeded, login, csrf):
    client = login(app, "ann1")
    _change(seeded.database, lambda s: accounts.reset_password(s, find_user(s, "ann1"), NEW_PASSWORD))
    assert client.get("/api/me").status_code == 401
    anon = TestClient(app, follow_redirects=False)
    token = csrf(anon.get("/login").text)
    assert anon.post("/login", data={"username": "ann1", "password": "correct horse battery",
                                     "csrf_token": token}).status_code == 401
    assert login(app, "ann1", NEW_PASSWORD).get("/api/me").status_code == 200
    with seeded.database.write() as session:
        try:
            accounts.reset_password(session, find_user(session, "ann1"), "password123")
        except Exception as e:  # noqa: BLE001
            assert "common" in str(e)
        else:
            raise AssertionError("a common password was accepted")


def test_revoke_sessions_ends_every_session_of_one_user_only(app, seeded, login):
    a, b, other = login(app, "ann1"), login(app, "ann1"), login(app, "ann2")
    assert _change(seeded.database, lambda s: accounts.revoke_sessions(s, find_user(s, "ann1"))) == 2
    assert a.get("/api/me").status_code == 401 and b.get("/api/me").status_code == 401
    assert other.get("/api/me").status_code == 200


def test_idle_timeout_ends_a_session_unused_too_long_and_use_restarts_it(database, seed, login):
    seed(database)
    app = create_app(database, idle_timeout=timedelta(hours=12))
    client = login(app, "ann1")

    def last_seen(ago: timedelta) -> None:
        _change(database, lambda s: s.execute(update(LoginSession).values(last_seen_at=utcnow() - ago)))

    last_seen(timedelta(hours=11))
    assert client.get("/api/me").status_code == 200                       # refreshes last_seen_at
    with database.read() as session:
        seen = session.scalar(select(LoginSession.last_seen_at))
    assert utcnow() - (seen if seen.tzinfo else seen.replace(tzinfo=utcnow().tzinfo)) < timedelta(minutes=1)
    last_seen(timedelta(hours=12, minutes=1))
    assert client.get("/api/me").status_code == 401


def test_purge_deletes_ended_session_rows_and_runs_at_login(app, seeded, login):
    login(app, "ann1")
    login(app, "ann2")
    live = login(app, "admin")
    _change(seeded.database, lambda s: s.execute(update(LoginSession).where(
        LoginSession.user_id == find_user(s, "ann1").id).values(expires_at=utcnow() - timedelta(seconds=1))))
    _change(seeded.database, lambda s: s.execute(update(LoginSession).where(
        LoginSession.user_id == find_user(s, "ann2").id).values(last_seen_at=utcnow() - IDLE_TIMEOUT)))
    assert _sessions(seeded.database) == 3
    login(app, "admin")                                                   # a login purges
    assert _sessions(seeded.database) == 2 and live.get("/api/me").status_code == 200
    assert _change(seeded.database, purge_expired_sessions) == 0


def run(*args):
    return CliRunner().invoke(label_app, [str(a) for a in args])


def test_cli_account_commands(app, seeded, login, tmp_path):
    from rlhfkit.feedback.db import database_url
    url = str(seeded.database.engine.url)
    db = url if not url.startswith("sqlite") else url.removeprefix("sqlite:///")
    assert database_url(db)
    client = login(app, "ann1")
    result = run("revoke-sessions", "ann1", "--db", db)
    assert result.exit_code == 0 and "ended 1 session of 'ann1'" in result.output
    assert client.get("/api/me").status_code == 401
    assert run("deactivate", "ann1", "--db", db).output.startswith("deactivated 'ann1'")
    with seeded.database.read() as session:
        assert find_user(session, "ann1").active is False
    assert run("activate", "ann1", "--db", db).exit_code == 0
    reset = run("reset-password", "ann1", "--password", NEW_PASSWORD, "--db", db)
    assert reset.exit_code == 0 and "new password set" in reset.output
    assert login(app, "ann1", NEW_PASSWORD).get("/api/me").status_code == 200
    with seeded.database.read() as session:   # each change has its audit row, the password not in it
        entries = [(e.actor, e.action, e.target, e.detail) for e in audit.latest(session)]
    rows = [(actor, action, target, detail.get("sessions_ended")) for actor, action, target, detail in entries]
    assert rows[:4] == [("cli", "user.password_reset", "user:ann1", 0), ("cli", "user.activate", "user:ann1", None),
                        ("cli", "user.deactivate", "user:ann1", 0), ("cli", "user.sessions_revoked", "user:ann1", 1)]
    assert NEW_PASSWORD not in str(entries)
    for args, message in [(["deactivate", "zed"], "no account named 'zed'"),
                          (["reset-password", "ann1", "--password", "short"], "a password needs 10")]:
        bad = run(*args, "--db", db)
        lines = [line for line in bad.output.splitlines() if line.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and message in lines[0], bad.output
