"""Hostile requests: bodies too large (refused before they are read), ids beyond 64 bits,
text that is not UTF-8, lookalike usernames, CR/LF in names, a forged Host header, and what
a server error shows."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from rlhfkit.feedback.models import Project, User, Vote

PASSWORD = "correct horse battery"
MIB = 1024 * 1024


def raw_request(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes]):
    """Call the ASGI app with a streamed body; (chunks the app pulled, status, response body)."""
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        if pulled >= len(chunks):
            await asyncio.sleep(3600)  # a client that sends nothing more
        pulled += 1
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("203.0.113.9", 4000), "server": ("testserver", 80), "state": {}}

    async def run():
        await asyncio.wait_for(app(scope, receive, send), timeout=30)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    return pulled, start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# ----------------------------------------------------------------------------- body size (finding 5)

@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=xyz", "text/plain"])
def test_a_large_body_is_refused_before_it_is_read(app, seeded, content_type):
    chunks = [b"x" * (256 * 1024)] * 40  # 10 MiB, streamed without a Content-Length
    pulled, status, _ = raw_request(app, "POST", f"/api/p/{seeded.project_id}/items/1/vote",
                                    {"content-type": content_type}, chunks)
    assert status == 413 and pulled <= 5, (pulled, status)


def test_a_declared_content_length_over_the_limit_is_refused_unread(app, seeded):
    for path, size in [("/api/p/1/undo", 2 * MIB), ("/login", 2 * MIB), ("/admin/projects", 60 * MIB),
                       (f"/admin/p/{seeded.project_id}/rounds", 200 * MIB)]:
        pulled, status, _ = raw_request(app, "POST", path, {"content-type": "application/json",
                                                            "content-length": str(size)}, [b"{}"])
        assert (status, pulled) == (413, 0), path


def test_uploads_keep_their_50_mib_cap_while_the_api_takes_1_mib(app, seeded, login, csrf):
    admin = login(app, "admin")
    token = csrf(admin.get("/admin").text)
    lines = "\n".join(json.dumps({"prompt": f"q{i} " + "x" * 1000, "responses": ["a", "b"]}) for i in range(2500))
    assert len(lines) > 2 * MIB
    created = admin.post("/admin/projects", data={"csrf_token": token, "name": "big", "overlap": "1"},
                         files={"file": ("big.jsonl", lines.encode(), "application/json")})
    assert created.status_code == 303, created.text[:500]
    big_json = {"choice": "A", "rationale": "x" * (2 * MIB)}
    response = admin.post(f"/api/p/{seeded.project_id}/items/1/vote", json=big_json,
                          headers={"X-CSRF-Token": token})
    assert response.status_code == 413


# ----------------------------------------------------------------------------- finding 9

def test_ids_beyond_64_bits_are_404_on_every_route(app, seeded, login):
    admin = login(app, "admin")
    token = admin.get("/api/me").json()["csrf_token"]
    client = TestClient(app, follow_redirects=False, raise_server_exceptions=False, cookies=admin.cookies)
    from rlhfkit.feedback.routes import admin as admin_routes
    from rlhfkit.feedback.routes import api, auth, label

    routes = [(method, route.path) for module in (auth, label, admin_routes, api) for route in module.router.routes
              if "{" in route.path for method in route.methods]
    assert len(routes) >= 14
    for huge in (2**31, 2**63, 2**64, 10**40):  # 2**31: beyond PostgreSQL's INTEGER ids
        for method, path in routes:
            url = re.sub(r"\{[^}]+\}", str(huge), path)
            response = client.request(method, url, data={"csrf_token": token} if method == "POST" else None)
            assert response.status_code == 404, (method, url, response.status_code)
            assert "content-security-policy" in response.headers


def test_a_server_error_keeps_the_security_headers_and_shows_no_traceback(app, seeded, login, monkeypatch):
    from rlhfkit.feedback.routes import label

    def broken(_markdown):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(label, "render_guidelines", broken)
    client = TestClient(app, raise_server_exceptions=False, cookies=login(app, "ann1").cookies)
    response = client.get(f"/p/{seeded.project_id}/guidelines")
    assert response.status_code == 500
    for header in ("content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy"):
        assert header in response.headers, header
    assert response.headers["cache-control"] == "no-store"
    assert "secret internal detail" not in response.text and "Traceback" not in response.text


def test_lone_surrogates_and_invalid_utf8_are_refused_not_stored(app, database, seed, login, api_headers):
    pid = seed(database, records=[{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(3)], overlap=1)
    client = login(app, "ann1")
    headers = api_headers(client)
    item = client.post(f"/api/p/{pid}/next", headers=headers).json()["item"]
    url = f"/api/p/{pid}/items/{item['item_id']}/vote"
    client_raise = TestClient(app, raise_server_exceptions=False, follow_redirects=False, cookies=client.cookies)
    for body in [b'{"choice": "A", "rationale": "a\\ud800b"}', b'{"choice": "A\\udfff"}',
                 b'{"choice": "A", "rationale": "\xff\xfe"}', b'{"choice": "A", "rationale": "\xed\xa0\x80"}']:
        response = client_raise.post(url, content=body, headers={**headers, "content-type": "application/json"})
        assert response.status_code in (400, 422), (body, response.status_code)
    form_url = f"/p/{pid}/items/{item['item_id']}"
    form = {**headers, "content-type": "application/x-www-form-urlencoded"}
    token = headers["X-CSRF-Token"]
    for body in [f"csrf_token={token}&choice=A&rationale=%ED%A0%80".encode(),
                 f"csrf_token={token}&choice=A&rationale=%FF".encode(),
                 f"csrf_token={token}&choice=A&rationale=".encode() + b"\xc3\x28"]:
        response = client_raise.post(form_url, content=body, headers=form)
        assert response.status_code == 400, (body, response.status_code)
    with database.read() as session:
        assert session.scalar(select(Vote)) is None
    # Raw UTF-8 (as curl --data sends it) is read as UTF-8, not latin-1 mojibake.
    body = f"csrf_token={token}&choice=A&rationale=".encode() + "café – ok".encode()
    assert client_raise.post(form_url, content=body, headers=form).status_code == 303
    with database.read() as session:
        assert session.scalar(select(Vote.rationale)) == "café – ok"
    # multipart text fields too (the admin's upload forms)
    admin = TestClient(app, raise_server_exceptions=False, cookies=login(app, "admin").cookies)
    admin_token = admin.get("/api/me").json()["csrf_token"]
    boundary = "b0undary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf_token\"\r\n\r\n{admin_token}\r\n"
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n").encode() + b"caf\xe9" + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overlap\"\r\n\r\n1\r\n--{boundary}--\r\n".encode()
    response = admin.post("/admin/projects", content=multipart,
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 400
    with database.read() as session:
        assert session.scalar(select(Project.name).where(Project.name.like("caf%"))) is None


def test_usernames_are_nfkc_normalized_and_unique_ignoring_case(app, seeded, login, csrf):
    admin = login(app, "admin")
    token = csrf(admin.get("/admin").text)

    def create(username: str):
        return admin.post("/admin/users", data={"csrf_token": token, "username": username,
                                                "password": "velvet otter 42", "role": "annotator"})

    for lookalike, why in [("Admin", "taken"), ("ＡＤＭＩＮ", "taken"), (" admin ", "taken"),
                           ("adm\u200bin", "invisible"), ("ad\u202emin", "invisible"), ("ann\u00001", "control"),
                           ("\u0430dmin", "alphabets"), ("line\nbreak", "control")]:
        response = create(lookalike)
        assert response.status_code == 400 and why in response.text, (lookalike, response.status_code)
    assert create("Ｂｏｂ").status_code == 303
    with seeded.database.read() as session:
        assert session.scalar(select(User.username).where(User.username_key == "bob")) == "Bob"
    assert create("BOB").status_code == 400
    client = TestClient(app, follow_redirects=False)
    page = client.get("/login").text
    assert client.post("/login", data={"username": "bob", "password": "velvet otter 42",
                                       "csrf_token": csrf(page)}).status_code == 303
    assert client.get("/api/me").json()["username"] == "Bob"
    assert create("Зоя").status_code == 303  # one alphabet that is not Latin is fine


def test_project_names_refuse_line_breaks_and_control_characters(app, seeded, login, csrf, tmp_path):
    admin = login(app, "admin")
    token = csrf(admin.get("/admin").text)
    for name in ["evil\r\nSet-Cookie: x=1", "tab\there", "zero\u200bwidth"]:
        response = admin.post("/admin/projects", data={"csrf_token": token, "name": name, "overlap": "1"})
        assert response.status_code == 400 and "line breaks" in response.text, name
    from rlhfkit.cli.label import label_app

    candidates = tmp_path / "c.jsonl"
    candidates.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    url = seeded.database.engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(label_app, ["import", str(candidates), "--project", "a\nb", "--db", url])
    assert result.exit_code == 2 and "line breaks" in result.output
    # an existing project keeps working: its settings can still be saved
    pid = seeded.project_id
    with seeded.database.write() as session:
        session.get(Project, pid).name = "old\nname"
        session.commit()
    assert admin.post(f"/admin/p/{pid}/settings", data={"csrf_token": token, "overlap": "1"}).status_code == 303


def test_the_trailing_slash_redirect_does_not_trust_the_host_header(app, seeded, login):
    client = TestClient(app, follow_redirects=False, cookies=login(app, "admin").cookies)
    response = client.get("/admin/?x=1", headers={"Host": "evil.example"})
    assert response.status_code in (307, 308) and response.headers["location"] == "/admin?x=1"
    for path in ["//evil.example/", "/\\evil.example/", "/nowhere/"]:
        _, status, _ = raw_request(app, "GET", path, {"host": "evil.example"}, [b""])
        assert status == 404, path


def test_scrypt_cost_is_current_and_old_hashes_upgrade_at_login(app, seeded, csrf, monkeypatch):
    from rlhfkit.feedback import security
    from rlhfkit.feedback.models import username_key

    monkeypatch.undo()  # the suite hashes cheaply; this test checks the real cost
    assert (security.SCRYPT_N, security.SCRYPT_R, security.SCRYPT_P) == (2**17, 8, 1)
    monkeypatch.setattr(security, "SCRYPT_N", 2**14)
    old_hash = security.hash_password("an old passphrase")  # what the app stored before
    monkeypatch.undo()
    assert old_hash.startswith("scrypt$16384$8$1$") and security.needs_rehash(old_hash)
    with seeded.database.write() as session:
        session.add(User(username="veteran", username_key=username_key("veteran"), password_hash=old_hash,
                         role="annotator"))
        session.commit()
    client = TestClient(app, follow_redirects=False)
    response = client.post("/login", data={"username": "veteran", "password": "an old passphrase",
                                           "csrf_token": csrf(client.get("/login").text)})
    assert response.status_code == 303
    with seeded.database.read() as session:
        new_hash = session.scalar(select(User.password_hash).where(User.username == "veteran"))
    assert new_hash.startswith("scrypt$131072$8$1$") and security.verify_password("an old passphrase", new_hash)


def test_hsts_is_sent_only_with_secure_cookies(database, seeded):
    from rlhfkit.feedback.app import create_app

    plain = TestClient(create_app(database)).get("/login")
    assert "strict-transport-security" not in plain.headers
    secure = TestClient(create_app(database, cookie_secure=True), base_url="https://testserver").get("/login")
    assert secure.headers["strict-transport-security"].startswith("max-age=31536000")
