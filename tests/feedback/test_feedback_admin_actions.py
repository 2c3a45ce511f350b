"""Issue #16: the account and membership actions on the admin pages (deactivate, activate,
reset a password, revoke sessions; a project's members and open_to_all). Each works through
its form, writes the CLI's audit action in the same transaction, refuses non-admins and
posts without the CSRF token, and shows its errors as one line."""

from __future__ import annotations

import html
import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from rlhfkit.feedback import accounts, membership
from rlhfkit.feedback.models import AuditEntry, LoginSession, Project, User
from rlhfkit.feedback.users import find_user

OLD_PASSWORD = "correct horse battery"
NEW_PASSWORD = "velvet otter 42"
ERROR_RE = re.compile(r'<p class="error" role="alert">(.*?)</p>', re.S)
ACTIONS = ("deactivate", "activate", "password", "revoke-sessions")


def _user(database, name: str) -> User:
    with database.read() as session:
        return find_user(session, name)  # detached, columns loaded


def _audit(database, action: str) -> list[AuditEntry]:
    with database.read() as session:
        return list(session.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)))


def _sessions(database, name: str) -> int:
    with database.read() as session:
        return len(session.scalars(select(LoginSession).join(User, LoginSession.user_id == User.id)
                                   .where(User.username == name)).all())


def _error(page: str) -> str:
    match = ERROR_RE.search(page)
    assert match, "page shows no error"
    return html.unescape(match.group(1))


def _can_log_in(app, csrf, name: str, password: str) -> bool:
    anon = TestClient(app, follow_redirects=False)
    response = anon.post("/login", data={"username": name, "password": password,
                                         "csrf_token": csrf(anon.get("/login").text)})
    return response.status_code == 303


def _admin_post(admin: TestClient, csrf, path: str, **data):
    return admin.post(path, data={"csrf_token": csrf(admin.get("/admin").text), **data})


def _members(database, project_id: int) -> tuple[bool, list[str]]:
    with database.read() as session:
        project = session.get(Project, project_id)
        return project.open_to_all, membership.member_names(session, project)


# ----------------------------------------------------------------------------- accounts

def test_deactivate_from_the_admin_page_ends_the_users_session_and_is_audited(app, seeded, login, csrf):
    db = seeded.database
    ann1, admin_id, ann1_id = login(app, "ann1"), _user(db, "admin").id, _user(db, "ann1").id
    assert ann1.get("/api/me").status_code == 200
    admin = login(app, "admin")
    response = _admin_post(admin, csrf, f"/admin/users/{ann1_id}/deactivate")
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    assert _user(db, "ann1").active is False and _sessions(db, "ann1") == 0
    assert ann1.get("/api/me").status_code == 401                        # the live session stops now
    assert ann1.get("/projects").status_code == 303
    assert not _can_log_in(app, csrf, "ann1", OLD_PASSWORD)
    [entry] = _audit(db, "user.deactivate")
    assert (entry.actor, entry.target) == (str(admin_id), "user:ann1")
    assert entry.detail == {"sessions_ended": 1, "via": "web"}
    page = admin.get("/admin").text
    assert "deactivated" in page and f'action="/admin/users/{ann1_id}/activate"' in page
    assert _user(db, "ann2").active is True


def test_activate_from_the_admin_page_lets_the_user_log_in_again(app, seeded, login, csrf):
    db = seeded.database
    with db.write() as session:
        accounts.deactivate(session, find_user(session, "ann1"))
        session.commit()
    assert not _can_log_in(app, csrf, "ann1", OLD_PASSWORD)
    admin = login(app, "admin")
    response = _admin_post(admin, csrf, f"/admin/users/{_user(db, 'ann1').id}/activate")
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    assert _user(db, "ann1").active is True
    assert login(app, "ann1").get("/api/me").status_code == 200
    [entry] = _audit(db, "user.activate")
    assert entry.target == "user:ann1" and entry.detail == {"via": "web"}


def test_reset_password_from_the_admin_page_ends_sessions_and_only_the_new_password_works(app, seeded, login,
                                                                                          csrf):
    db = seeded.database
    ann1, ann1_id = login(app, "ann1"), _user(db, "ann1").id
    admin = login(app, "admin")
    response = _admin_post(admin, csrf, f"/admin/users/{ann1_id}/password", password=NEW_PASSWORD)
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    assert ann1.get("/api/me").status_code == 401
    assert not _can_log_in(app, csrf, "ann1", OLD_PASSWORD)
    assert login(app, "ann1", NEW_PASSWORD).get("/api/me").status_code == 200
    [entry] = _audit(db, "user.password_reset")
    assert entry.target == "user:ann1" and entry.detail == {"sessions_ended": 1, "via": "web"}
    assert NEW_PASSWORD not in str(entry.detail)


def test_reset_password_applies_the_password_policy_with_a_one_line_error(app, seeded, login, csrf):
    db = seeded.database
    admin, ann1_id = login(app, "admin"), _user(db, "ann1").id
    for weak, word in (("password123", "common"), ("short", "characters"), ("my ann1 velvet otter", "username")):
        response = _admin_post(admin, csrf, f"/admin/users/{ann1_id}/password", password=weak)
        assert response.status_code == 400, weak
        error = _error(response.text)
        assert word in error and "\n" not in error, error
    assert _can_log_in(app, csrf, "ann1", OLD_PASSWORD)
    assert _audit(db, "user.password_reset") == []


def test_revoke_sessions_from_the_admin_page_ends_every_session_of_that_user_only(app, seeded, login, csrf):
    db = seeded.database
    a, b, other = login(app, "ann1"), login(app, "ann1"), login(app, "ann2")
    admin = login(app, "admin")
    response = _admin_post(admin, csrf, f"/admin/users/{_user(db, 'ann1').id}/revoke-sessions")
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    assert a.get("/api/me").status_code == 401 and b.get("/api/me").status_code == 401
    assert other.get("/api/me").status_code == 200 and admin.get("/admin").status_code == 200
    assert _user(db, "ann1").active is True and _can_log_in(app, csrf, "ann1", OLD_PASSWORD)
    [entry] = _audit(db, "user.sessions_revoked")
    assert entry.target == "user:ann1" and entry.detail == {"sessions_ended": 2, "via": "web"}


def test_an_admin_cannot_deactivate_themselves_or_revoke_their_own_sessions(app, seeded, login, csrf):
    db = seeded.database
    admin, admin_id = login(app, "admin"), _user(db, "admin").id
    page = admin.get("/admin").text
    assert f'action="/admin/users/{admin_id}/deactivate"' not in page
    assert f'action="/admin/users/{admin_id}/revoke-sessions"' not in page
    for action, word in (("deactivate", "deactivate your own account"),
                         ("revoke-sessions", "revoke your own sessions")):
        response = _admin_post(admin, csrf, f"/admin/users/{admin_id}/{action}")
        assert response.status_code == 400, action
        error = _error(response.text)
        assert word in error and "\n" not in error, error
    assert _user(db, "admin").active is True and admin.get("/admin").status_code == 200
    assert _audit(db, "user.deactivate") == [] and _audit(db, "user.sessions_revoked") == []


def test_an_account_id_that_names_no_account_is_404(app, seeded, login, csrf):
    admin = login(app, "admin")
    for user_id in ("999", str(2**31 - 1), str(2**31), str(2**63), "0"):
        for action in ACTIONS:
            response = _admin_post(admin, csrf, f"/admin/users/{user_id}/{action}", password=NEW_PASSWORD)
            assert response.status_code == 404, (user_id, action)


# ----------------------------------------------------------------------------- membership

def test_dashboard_shows_access_and_members_and_changes_them(app, seeded, login, csrf):
    db, pid = seeded.database, seeded.project_id
    admin, ann2 = login(app, "admin"), login(app, "ann2")
    dashboard = admin.get(f"/admin/p/{pid}").text
    assert "Access: open to all annotators." in dashboard and "No members." in dashboard
    assert ann2.get(f"/p/{pid}/guidelines").status_code == 200

    response = _admin_post(admin, csrf, f"/admin/p/{pid}/members", add="ann1, ann2")
    assert response.status_code == 303 and response.headers["location"] == f"/admin/p/{pid}"
    assert _members(db, pid) == (True, ["ann1", "ann2"])
    response = _admin_post(admin, csrf, f"/admin/p/{pid}/members", access="members")
    assert response.status_code == 303 and _members(db, pid) == (False, ["ann1", "ann2"])
    response = _admin_post(admin, csrf, f"/admin/p/{pid}/members", remove="ann2")
    assert response.status_code == 303 and _members(db, pid) == (False, ["ann1"])
    assert ann2.get(f"/p/{pid}/guidelines").status_code == 404            # no longer a member
    dashboard = admin.get(f"/admin/p/{pid}").text
    assert "Access: members only: ann1." in dashboard
    assert '<option value="members" selected>' in dashboard and 'name="remove" value="ann1"' in dashboard

    response = _admin_post(admin, csrf, f"/admin/p/{pid}/members", access="open")
    assert response.status_code == 303 and _members(db, pid) == (True, ["ann1"])
    assert ann2.get(f"/p/{pid}/guidelines").status_code == 200
    entries = _audit(db, "project.members")
    assert {e.target for e in entries} == {"project:demo"}
    assert [e.detail for e in entries] == [
        {"added": ["ann1", "ann2"], "removed": [], "open_to_all": True, "via": "web"},
        {"added": [], "removed": [], "open_to_all": False, "via": "web"},
        {"added": [], "removed": ["ann2"], "open_to_all": False, "via": "web"},
        {"added": [], "removed": [], "open_to_all": True, "via": "web"},
    ]


def test_member_errors_are_one_line_and_change_nothing(app, seeded, login, csrf):
    db, pid = seeded.database, seeded.project_id
    admin = login(app, "admin")
    for data, word in (({"add": "ann1, nobody"}, "no account named 'nobody'"),
                       ({"add": "admin"}, "admins see every project"),
                       ({"remove": "ghost"}, "no account named 'ghost'"),
                       ({"access": "everyone"}, "access must be one of")):
        response = _admin_post(admin, csrf, f"/admin/p/{pid}/members", **data)
        assert response.status_code == 400, data
        error = _error(response.text)
        assert word in error and "\n" not in error, error
    assert _members(db, pid) == (True, [])
    assert _audit(db, "project.members") == []
    assert _admin_post(admin, csrf, "/admin/p/999/members", add="ann1").status_code == 404


# ----------------------------------------------------------------------------- refused callers

def _action_posts(database, project_id: int) -> list[tuple[str, dict[str, str]]]:
    ann2_id = _user(database, "ann2").id
    return [(f"/admin/users/{ann2_id}/deactivate", {}), (f"/admin/users/{ann2_id}/activate", {}),
            (f"/admin/users/{ann2_id}/password", {"password": NEW_PASSWORD}),
            (f"/admin/users/{ann2_id}/revoke-sessions", {}),
            (f"/admin/p/{project_id}/members", {"add": "ann2", "access": "members"})]


def _nothing_changed(database, app, csrf, project_id: int) -> None:
    assert _user(database, "ann2").active is True
    assert _can_log_in(app, csrf, "ann2", OLD_PASSWORD)
    assert _members(database, project_id) == (True, [])
    with database.read() as session:
        assert session.scalars(select(AuditEntry)).all() == []


def test_annotators_and_visitors_cannot_use_the_admin_actions(app, seeded, login, csrf, api_headers):
    db, pid = seeded.database, seeded.project_id
    ann1, ann2 = login(app, "ann1"), login(app, "ann2")
    token = api_headers(ann1)["X-CSRF-Token"]
    anon = TestClient(app, follow_redirects=False)
    anon_token = csrf(anon.get("/login").text)
    for path, data in _action_posts(db, pid):
        assert ann1.post(path, data={"csrf_token": token, **data}).status_code == 403, path
        response = anon.post(path, data={"csrf_token": anon_token, **data})
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    assert ann2.get("/api/me").status_code == 200
    _nothing_changed(db, app, csrf, pid)


def test_admin_actions_need_the_csrf_token_of_the_admins_own_session(app, seeded, login, csrf, api_headers):
    db, pid = seeded.database, seeded.project_id
    admin, ann2 = login(app, "admin"), login(app, "ann2")
    others = api_headers(ann2)["X-CSRF-Token"]
    for path, data in _action_posts(db, pid):
        assert admin.post(path, data=data).status_code == 403, path                                   # none
        assert admin.post(path, data={"csrf_token": "forged", **data}).status_code == 403, path      # wrong
        assert admin.post(path, data={"csrf_token": others, **data}).status_code == 403, path        # not its own
    assert ann2.get("/api/me").status_code == 200
    _nothing_changed(db, app, csrf, pid)
