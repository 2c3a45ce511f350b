"""Security of the web app through its real HTTP interface (FastAPI TestClient):
authentication, annotators isolated from each other, escaping, CSRF, SQL injection."""

import json
import re

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rlhfkit.feedback.models import Item, Project, User, Vote

FIRST_ITEM = re.compile(r'action="/p/(\d+)/items/(\d+)"')


def open_item(client, project_id):
    """Claim the client's next item ("Start labeling") and open it; (item_id, page html)."""
    token = client.get("/api/me").json()["csrf_token"]
    response = client.post(f"/p/{project_id}/label", data={"csrf_token": token})
    assert response.status_code == 303
    page = client.get(response.headers["location"])
    assert page.status_code == 200
    return int(FIRST_ITEM.search(page.text).group(2)), page.text


def count(database, model):
    with database.read() as session:
        return session.scalar(select(func.count()).select_from(model))


# ----------------------------------------------------------------------------- authentication

def test_every_route_refuses_anonymous_requests(app, seeded, csrf):
    pid = seeded.project_id
    pages = ["/projects", f"/p/{pid}/guidelines", f"/p/{pid}/label", f"/p/{pid}/items/1",
             f"/p/{pid}/history", "/admin", f"/admin/p/{pid}", f"/admin/p/{pid}/export"]
    api = ["/api/me", "/api/votes", "/api/votes/1"]
    posts = [f"/p/{pid}/label", f"/p/{pid}/items/1", f"/p/{pid}/undo", "/admin/users", "/admin/projects",
             f"/admin/p/{pid}/rounds", f"/admin/p/{pid}/settings", f"/admin/p/{pid}/release",
             f"/admin/p/{pid}/members", "/admin/users/2/deactivate", "/admin/users/2/activate",
             "/admin/users/2/password", "/admin/users/2/revoke-sessions", "/logout"]
    api_posts = [f"/api/p/{pid}/next", f"/api/p/{pid}/items/1/vote", f"/api/p/{pid}/undo"]
    public = {("GET", "/"), ("GET", "/login"), ("POST", "/login")}
    # Every route of the app is in one of the lists above: a new route cannot slip by untested.
    from rlhfkit.feedback.routes import admin, auth, label
    from rlhfkit.feedback.routes import api as api_routes

    declared = {(method, re.sub(r"\{[^}]+\}", "X", route.path))
                for module in (auth, label, admin, api_routes) for route in module.router.routes
                for method in route.methods}
    listed = {(method, re.sub(r"/\d+", "/X", path))
              for method, paths in (("GET", pages + api), ("POST", posts + api_posts)) for path in paths}
    assert declared == listed | public, declared ^ (listed | public)

    client = TestClient(app, follow_redirects=False)
    for path in pages:
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), path
    for path in api:
        assert client.get(path).status_code == 401, path
    # Even with a valid CSRF token for its anonymous cookie, a visitor cannot post anything.
    token = csrf(client.get("/login").text)
    for path in posts:
        response = client.post(path, data={"csrf_token": token, "username": "x", "password": "y" * 8,
                                           "name": "p", "overlap": "1", "choice": "A"})
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    for path in api_posts:
        assert client.post(path, json={"choice": "A"}, headers={"X-CSRF-Token": token}).status_code == 401
    assert count(seeded.database, Vote) == 0 and count(seeded.database, User) == 3


def test_forged_or_tampered_session_cookie_is_refused(app, seeded, login):
    client = login(app, "ann1")
    cookie = client.cookies.get("rlhf_session")
    value, signature = cookie.rsplit(".", 1)
    forged = TestClient(app, follow_redirects=False)
    forged.cookies.set("rlhf_session", value + "x." + signature)
    assert forged.get("/api/me").status_code == 401
    forged.cookies.set("rlhf_session", "anything")
    assert forged.get("/projects").status_code == 303


def test_login_logout_and_cookie_flags(app, seeded, csrf):
    client = TestClient(app, follow_redirects=False)
    page = client.get("/login")
    bad = client.post("/login", data={"username": "ann1", "password": "wrong password",
                                      "csrf_token": csrf(page.text)})
    assert bad.status_code == 401 and "Wrong username or password" in bad.text
    good = client.post("/login", data={"username": "ann1", "password": "correct horse battery",
                                       "csrf_token": csrf(page.text), "next": "//evil.example/x"})
    assert good.headers["location"] == "/projects"  # an off-site next is ignored
    set_cookie = good.headers["set-cookie"].lower()
    assert "rlhf_session=" in set_cookie and "httponly" in set_cookie and "samesite=lax" in set_cookie
    assert client.get("/api/me").json()["username"] == "ann1"
    projects = client.get("/projects")
    assert client.post("/logout", data={"csrf_token": csrf(projects.text)}).status_code == 303
    assert client.get("/api/me").status_code == 401
    assert "content-security-policy" in projects.headers


def test_annotator_cannot_use_admin_pages(app, seeded, login):
    client = login(app, "ann1")
    pid = seeded.project_id
    for path in ["/admin", f"/admin/p/{pid}", f"/admin/p/{pid}/export"]:
        assert client.get(path).status_code == 403, path
    token = client.get("/api/me").json()["csrf_token"]
    response = client.post("/admin/users", data={"csrf_token": token, "username": "sneaky",
                                                 "password": "password123", "role": "admin"})
    assert response.status_code == 403
    assert count(seeded.database, User) == 3


# ----------------------------------------------------------------------------- isolation

def test_annotator_cannot_read_or_change_another_annotators_votes(app, database, seed, login, csrf):
    pid = seed(database, overlap=1)  # every item goes to one annotator only
    ann1, ann2 = login(app, "ann1"), login(app, "ann2")
    item_id, page = open_item(ann1, pid)
    ann1.post(f"/p/{pid}/items/{item_id}", data={"csrf_token": csrf(page), "choice": "A",
                                                 "rationale": "ann1's private reason"})
    (vote,) = ann1.get("/api/votes").json()["votes"]
    token2 = ann2.get("/api/me").json()["csrf_token"]

    # read: by id, in lists, through the item page and the history page
    assert ann2.get(f"/api/votes/{vote['vote_id']}").status_code == 404
    assert ann2.get("/api/votes").json()["votes"] == []
    assert ann2.get(f"/p/{pid}/items/{item_id}").status_code == 404
    assert "private reason" not in ann2.get(f"/p/{pid}/history").text
    # change: form post, JSON post, undo
    assert ann2.post(f"/p/{pid}/items/{item_id}", data={"csrf_token": token2, "choice": "B"}).status_code == 404
    assert ann2.post(f"/api/p/{pid}/items/{item_id}/vote", json={"choice": "B"},
                     headers={"X-CSRF-Token": token2}).status_code == 404
    assert ann2.post(f"/api/p/{pid}/undo", headers={"X-CSRF-Token": token2}).json() == {"undone_item_id": None}
    assert ann1.get(f"/api/votes/{vote['vote_id']}").json() == vote  # untouched
    # ann2's own work goes to a different item
    other_item, _ = open_item(ann2, pid)
    assert other_item != item_id


def test_undo_and_edit_own_votes(app, seeded, login, csrf):
    pid = seeded.project_id
    client = login(app, "ann1")
    first, page = open_item(client, pid)
    client.post(f"/p/{pid}/items/{first}", data={"csrf_token": csrf(page), "choice": "A", "strength": "3"})
    second, page = open_item(client, pid)
    client.post(f"/p/{pid}/items/{second}", data={"csrf_token": csrf(page), "choice": "tie"})
    # undo removes the last vote and shows its item again
    response = client.post(f"/p/{pid}/undo", data={"csrf_token": csrf(page)})
    assert response.headers["location"] == f"/p/{pid}/items/{second}?undone=1"
    assert "was undone" in client.get(response.headers["location"]).text
    assert [v["item_id"] for v in client.get("/api/votes").json()["votes"]] == [first]
    # edit: the item page shows the saved answer; posting again overwrites it
    edit = client.get(f"/p/{pid}/items/{first}").text
    assert "editing your vote" in edit
    assert re.search(r'value="A" checked', edit) and re.search(r'value="3" checked', edit)
    client.post(f"/p/{pid}/items/{first}", data={"csrf_token": csrf(edit), "choice": "B"})
    (vote,) = client.get("/api/votes").json()["votes"]
    assert vote["item_id"] == first and vote["strength"] is None
    assert vote["ranks"] == ([1, 0] if vote["display_order"] == [0, 1] else [0, 1])  # B on screen


# ----------------------------------------------------------------------------- escaping

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_html_in_prompts_responses_and_names_is_shown_as_text(app, database, seed, login, csrf, claim):
    records = [{"prompt": [{"role": "system", "content": XSS}, {"role": "user", "content": "Q " + XSS}],
                "responses": ["R1 " + XSS, "R2 </div><b>bold</b>"]},
               {"prompt": XSS, "responses": ["a" + XSS, "b", "c"]}]
    pid = seed(database, records=records, annotators=("ann1", "<i>ann2</i>"),
               guidelines=f"# Rules\n\n{XSS}\n\n[click](javascript:alert(1))")
    with database.write() as session:
        session.get(Project, pid).name = "proj " + XSS
        session.commit()
    client = login(app, "ann1")
    item_id, page = open_item(client, pid)
    client.post(f"/p/{pid}/items/{item_id}", data={"csrf_token": csrf(page), "choice": "A", "rationale": XSS})
    admin = login(app, "admin")
    pages = {
        "label": page,
        "ranking": claim(client, pid).text,
        "history": client.get(f"/p/{pid}/history").text,
        "guidelines": client.get(f"/p/{pid}/guidelines").text,
        "projects": client.get("/projects").text,
        "admin": admin.get("/admin").text,
        "dashboard": admin.get(f"/admin/p/{pid}").text,
    }
    for name, html in pages.items():
        assert "<script>alert" not in html and "<img src=x" not in html, name
        assert "&lt;script&gt;" in html, name
    assert "&lt;/div&gt;&lt;b&gt;bold&lt;/b&gt;" in pages["label"]
    assert 'href="javascript:' not in pages["guidelines"]
    assert "<h1>Rules</h1>" in pages["guidelines"]  # Markdown itself is rendered
    assert 'data-kind="ranking"' in pages["ranking"]
    assert "&lt;i&gt;ann2&lt;/i&gt;" in pages["dashboard"] and "<i>ann2" not in pages["dashboard"]


def test_templates_never_mark_text_safe():
    from pathlib import Path

    import rlhfkit.feedback as feedback

    for template in (Path(feedback.__file__).parent / "templates").glob("*.html"):
        assert "|safe" not in template.read_text().replace(" ", ""), template.name


# ----------------------------------------------------------------------------- CSRF

def test_posts_need_the_csrf_token_of_the_callers_own_session(app, seeded, login, csrf):
    pid = seeded.project_id
    ann1, ann2 = login(app, "ann1"), login(app, "ann2")
    item_id, page = open_item(ann1, pid)
    token1, token2 = csrf(page), ann2.get("/api/me").json()["csrf_token"]
    url = f"/p/{pid}/items/{item_id}"
    assert ann1.post(url, data={"choice": "A"}).status_code == 403                         # none
    assert ann1.post(url, data={"choice": "A", "csrf_token": "forged"}).status_code == 403  # wrong
    assert ann1.post(url, data={"choice": "A", "csrf_token": token2}).status_code == 403    # someone else's
    assert ann1.post(f"/api/p/{pid}/items/{item_id}/vote", json={"choice": "A"}).status_code == 403
    assert ann1.post(f"/api/p/{pid}/items/{item_id}/vote", json={"choice": "A"},
                     headers={"X-CSRF-Token": token2}).status_code == 403
    assert ann1.post(f"/p/{pid}/undo").status_code == 403
    assert ann1.post("/logout").status_code == 403
    assert count(seeded.database, Vote) == 0
    assert ann1.post(url, data={"choice": "A", "csrf_token": token1}).status_code == 303
    assert ann1.post(f"/api/p/{pid}/items/{item_id}/vote", json={"choice": "B"},
                     headers={"X-CSRF-Token": token1}).status_code == 200
    assert count(seeded.database, Vote) == 1


def test_login_form_needs_its_csrf_token(app, seeded):
    client = TestClient(app, follow_redirects=False)
    client.get("/login")
    response = client.post("/login", data={"username": "ann1", "password": "correct horse battery"})
    assert response.status_code == 403 and "rlhf_session" not in client.cookies


# ----------------------------------------------------------------------------- SQL injection

INJECTIONS = ["'; DROP TABLE votes; --", "\" OR \"1\"=\"1", "admin'--", "1 OR 1=1",
              "x'); DELETE FROM users WHERE ('a'='a", "%' UNION SELECT password_hash FROM users --"]


def test_sql_injection_strings_are_stored_verbatim_and_harmless(app, database, seed, login, csrf, tmp_path):
    pid = seed(database)
    admin = login(app, "admin")
    token = admin.get("/api/me").json()["csrf_token"]
    for i, evil in enumerate(INJECTIONS):
        # login form: both fields
        anon = TestClient(app, follow_redirects=False)
        page = anon.get("/login").text
        assert anon.post("/login", data={"username": evil, "password": evil + "pad",
                                         "csrf_token": csrf(page)}).status_code == 401
        # admin forms: account, project (name, guidelines, model version, JSONL fields)
        assert admin.post("/admin/users", data={"csrf_token": token, "username": evil,
                                                "password": f"unrelated secret {i}", "role": "annotator"}
                          ).status_code == 303
        jsonl = json.dumps({"id": evil, "prompt": evil, "responses": [evil, evil + "2"], "model_version": evil})
        response = admin.post("/admin/projects", data={"csrf_token": token, "name": f"{evil} {i}", "overlap": "1",
                                                       "guidelines": evil, "model_version": evil},
                              files={"file": ("round.jsonl", jsonl.encode(), "application/json")})
        assert response.status_code == 303, response.text
        # fields that must be numbers or choices are refused cleanly, not with a server error
        assert admin.post("/admin/projects", data={"csrf_token": token, "name": f"n{i}", "overlap": evil}
                          ).status_code == 400
        assert admin.get(f"/admin/p/{pid}/export", params={"format": evil}).status_code == 400
        assert admin.get(f"/admin/p/{pid}", params={"round": evil}).status_code == 400

    # the annotator with an injection string as name logs in and votes with injection strings
    evil = INJECTIONS[0]
    client = login(app, evil, "unrelated secret 0")
    with database.read() as session:
        evil_project = session.scalar(select(Project).where(Project.name == f"{evil} 0"))
    item_id, page = open_item(client, evil_project.id)
    url = f"/p/{evil_project.id}/items/{item_id}"
    for field in ("choice", "strength"):
        data = {"csrf_token": csrf(page), "choice": "A", field: evil}
        assert client.post(url, data=data).status_code == 400
    assert client.post(url, data={"csrf_token": csrf(page), "choice": "A", "rationale": evil}).status_code == 303
    assert client.get("/p/1 OR 1=1/label").status_code in (400, 404)

    with database.read() as session:
        usernames = set(session.scalars(select(User.username)))
        assert set(INJECTIONS) <= usernames and len(usernames) == 3 + len(INJECTIONS)
        assert session.scalar(select(func.count(Project.id))) == 1 + len(INJECTIONS)
        item = session.get(Item, item_id)
        assert (item.prompt, item.responses, item.external_id, item.model_version) == (
            evil, [evil, evil + "2"], evil, evil)
        assert evil_project.guidelines_md == evil
        (vote,) = session.scalars(select(Vote))
        assert vote.rationale == evil
