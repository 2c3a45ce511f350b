"""What the pages show: counts, the end of the queue, upload errors, settings."""

import json
import re

from sqlalchemy import select

from rlhfkit.feedback.models import Project, Round


def cells(html: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)]


def test_admin_home_and_projects_show_counts(app, seeded, login, csrf, claim):
    admin = login(app, "admin")
    home = admin.get("/admin").text
    # demo: overlap 2, 3 items, 0 votes
    assert cells(home)[:4] == ["demo", "2", "3", "0"]
    ann = login(app, "ann1")
    page = claim(ann, seeded.project_id).text
    ann.post(re.search(r'action="(/p/\d+/items/\d+)"', page).group(1), data={"csrf_token": csrf(page), "choice": "A"})
    assert "1 labeled by you · 3 items in the project" in ann.get("/projects").text
    assert cells(admin.get("/admin").text)[:4] == ["demo", "2", "3", "1"]


def test_end_of_queue_page(app, database, seed, login, csrf, claim):
    pid = seed(database, records=[{"prompt": "only", "responses": ["a", "b"]}])
    client = login(app, "ann1")
    page = claim(client, pid).text
    client.post(f"/p/{pid}/items/1", data={"csrf_token": csrf(page), "choice": "tie"})
    done = client.get(f"/p/{pid}/label")
    assert done.status_code == 200 and "Nothing left to label" in done.text and "1 item" in done.text


def test_admin_creates_project_and_round_by_upload(app, seeded, login, csrf):
    admin = login(app, "admin")
    token = csrf(admin.get("/admin").text)
    good = "\n".join(json.dumps({"prompt": f"q{i}", "responses": ["a", "b", "c"]}) for i in range(3))
    response = admin.post("/admin/projects", data={"csrf_token": token, "name": "new", "overlap": "3",
                                                   "guidelines": "# Be kind", "model_version": "v7"},
                          files={"file": ("c.jsonl", good.encode(), "application/json")})
    assert response.status_code == 303
    dashboard = admin.get(response.headers["location"]).text
    assert "v7" in dashboard and "0 / 6" in dashboard  # 3 items × min(overlap 3, 2 annotators)
    pid = int(response.headers["location"].rsplit("/", 1)[1])

    bad = good + "\n" + json.dumps({"prompt": "q", "responses": "not a list"})
    response = admin.post(f"/admin/p/{pid}/rounds", data={"csrf_token": token, "model_version": "v8"},
                          files={"file": ("next.jsonl", bad.encode(), "application/json")})
    assert response.status_code == 400
    assert "next.jsonl:4: field &#39;responses&#39;" in response.text
    assert admin.post(f"/admin/p/{pid}/rounds", data={"csrf_token": token, "model_version": "v8"},
                      files={"file": ("next.jsonl", good.encode(), "application/json")}).status_code == 303
    duplicate = admin.post("/admin/projects", data={"csrf_token": token, "name": "new", "overlap": "1"})
    assert duplicate.status_code == 400 and "already exists" in duplicate.text
    with seeded.database.read() as session:
        project = session.get(Project, pid)
        assert [(r.number, r.model_version) for r in session.scalars(select(Round).where(Round.project_id == pid))] \
            == [(1, "v7"), (2, "v8")]
        assert project.guidelines_md == "# Be kind"


def test_settings_change_overlap_and_guidelines(app, seeded, login, csrf):
    admin = login(app, "admin")
    pid = seeded.project_id
    token = csrf(admin.get(f"/admin/p/{pid}").text)
    assert admin.post(f"/admin/p/{pid}/settings", data={"csrf_token": token, "overlap": "0"}).status_code == 400
    admin.post(f"/admin/p/{pid}/settings", data={"csrf_token": token, "overlap": "1", "guidelines": "Use **care**."})
    assert "<strong>care</strong>" in admin.get(f"/p/{pid}/guidelines").text
    with seeded.database.read() as session:
        assert session.get(Project, pid).overlap == 1


def test_ranking_form_errors_keep_what_was_typed(app, seeded, login, csrf, claim):
    client = login(app, "ann1")
    pid = seeded.project_id
    for _ in range(2):  # the two pairwise items come first
        page = claim(client, pid).text
        client.post(re.search(r'action="(/p/\d+/items/\d+)"', page).group(1),
                    data={"csrf_token": csrf(page), "choice": "A"})
    page = claim(client, pid).text
    assert 'data-kind="ranking"' in page
    url = re.search(r'action="(/p/\d+/items/\d+)"', page).group(1)
    response = client.post(url, data={"csrf_token": csrf(page), "ranking": "D > C", "rationale": "keep me"})
    assert response.status_code == 400
    assert "not ranked yet: A, B" in response.text
    assert 'value="D &gt; C"' in response.text and "keep me" in response.text
    assert client.post(url, data={"csrf_token": csrf(page), "ranking": "D > C > A = B"}).status_code == 303
