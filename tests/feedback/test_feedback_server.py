"""Reliability against a real server: `rlhf label serve` (uvicorn) in a subprocess on
127.0.0.1, a random free port, a SQLite file. Load is bounded in count and time and only
goes to loopback."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select, update

from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.models import Item, Project, Round, Vote, utcnow
from rlhfkit.feedback.projects import STALE_STAGING

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
PASSWORD = "correct horse battery"
REQUEST_TIMEOUT_S = 20


def login(url: str, username: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S)
    page = client.get("/login")
    token = CSRF_RE.search(page.text).group(1)
    response = client.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 303, response.text
    client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf_token"]
    return client


def vote_body(item: dict) -> dict:
    """Pairwise: A better; ranking: the shown order with the last two tied."""
    if item["kind"] == "pairwise":
        return {"choice": "A", "strength": 2}
    letters = [c["letter"] for c in item["candidates"]]
    return {"ranking": " > ".join(letters[:-2]) + f" > {letters[-2]} = {letters[-1]}"}


def annotate(client: httpx.Client, project_id: int, max_votes: int, stop: threading.Event,
             progress: list | None = None) -> list[dict]:
    """Vote until `max_votes`, no work left, `stop` or a dead server; the acknowledged votes
    (also appended to `progress`, shared between threads)."""
    acknowledged: list[dict] = []
    try:
        for _ in range(max_votes):
            if stop.is_set():
                break
            item = client.post(f"/api/p/{project_id}/next").json()["item"]
            if item is None:
                break
            response = client.post(f"/api/p/{project_id}/items/{item['item_id']}/vote", json=vote_body(item))
            response.raise_for_status()
            acknowledged.append(response.json())
            if progress is not None:
                progress.append(acknowledged[-1])
    except httpx.TransportError:
        pass  # the server was killed: what was acknowledged before counts
    return acknowledged


@pytest.fixture
def labeled_db(database, seed):
    """20 annotators and 120 items (100 pairwise, 20 4-way rankings); (database URL, project id)."""
    records = ([{"prompt": f"pair {i}", "responses": [f"a{i}", f"b{i}"]} for i in range(100)]
               + [{"prompt": f"rank {i}", "responses": [f"w{i}", f"x{i}", f"y{i}", f"z{i}"]} for i in range(20)])
    project_id = seed(database, annotators=[f"ann{i:02d}" for i in range(20)], overlap=2, records=records)
    return database.engine.url.render_as_string(hide_password=False), project_id


def stored_votes(url: str) -> dict[int, Vote]:
    database = open_database(url)
    with database.read() as session:
        votes = {v.id: v for v in session.scalars(select(Vote))}
    database.close()
    return votes


@pytest.mark.timeout(120)
def test_twenty_concurrent_annotators_lose_no_vote(labeled_db, server_process):
    url, project_id = labeled_db
    server = server_process(url)
    try:
        clients = [login(server.url, f"ann{i:02d}") for i in range(20)]
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=20) as pool:
            futures = [pool.submit(annotate, c, project_id, 10, stop) for c in clients]
            results = [f.result(timeout=90) for f in futures]
        for c in clients:
            c.close()
    finally:
        server.stop()

    acknowledged = [vote for result in results for vote in result]
    assert len(acknowledged) == 200  # 20 annotators × 10 votes, every request answered 200
    votes = stored_votes(url)
    assert len(votes) == 200
    for ack in acknowledged:
        stored = votes[ack["vote_id"]]
        assert (stored.item_id, stored.ranks, stored.both_bad) == (ack["item_id"], ack["ranks"], ack["both_bad"])
    per_item: dict[int, int] = {}
    for vote in votes.values():
        per_item[vote.item_id] = per_item.get(vote.item_id, 0) + 1
    assert max(per_item.values()) <= 2  # overlap held under concurrency


@pytest.mark.timeout(120)
def test_sigkill_mid_session_keeps_every_acknowledged_vote(labeled_db, server_process):
    url, project_id = labeled_db
    server = server_process(url)
    stop = threading.Event()
    progress: list = []
    try:
        clients = [login(server.url, f"ann{i:02d}") for i in range(6)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(annotate, c, project_id, 40, stop, progress) for c in clients]
            deadline = time.monotonic() + 60
            # Kill while the annotators are still voting (each stops at 40 votes at most).
            while time.monotonic() < deadline and len(progress) < 30 and not any(f.done() for f in futures):
                time.sleep(0.02)
            server.kill()
            stop.set()
            results = [f.result(timeout=30) for f in futures]
    finally:
        server.stop()
    acknowledged = [vote for result in results for vote in result]
    assert 30 <= len(acknowledged) < 6 * 40, "the kill did not land mid-session"

    restarted = server_process(url)
    try:
        for client, result in zip(clients, results, strict=True):
            # The login itself survived the crash: the same cookie works on the new process.
            again = httpx.Client(base_url=restarted.url, cookies=client.cookies, timeout=REQUEST_TIMEOUT_S)
            mine = {v["vote_id"]: v for v in again.get("/api/votes").json()["votes"]}
            for ack in result:
                assert mine[ack["vote_id"]] == ack
            again.close()
            client.close()
    finally:
        restarted.stop()
    votes = stored_votes(url)
    assert {ack["vote_id"] for ack in acknowledged} <= set(votes)


def _project_id(url: str, name: str) -> int:
    database = open_database(url)
    with database.read() as session:
        project_id = session.scalar(select(Project.id).where(Project.name == name))
    database.close()
    return project_id


def _staged_items(url: str, project: str) -> tuple[int, int]:
    """(items in rounds being imported, items in published rounds) of `project`."""
    database = open_database(url)
    with database.read() as session:
        rows = session.execute(select(Round.number, func.count(Item.id)).join(Item, Item.round_id == Round.id)
                               .join(Project, Round.project_id == Project.id).where(Project.name == project)
                               .group_by(Round.number)).all()
    database.close()
    return sum(n for number, n in rows if number < 0), sum(n for number, n in rows if number > 0)


@pytest.mark.timeout(150)
def test_sigkill_mid_import_loses_no_vote_and_shows_no_half_round(labeled_db, server_process, tmp_path):
    """`rlhf label import` of 40k items killed after its first chunks while 4 annotators vote:
    every acknowledged vote is kept, annotators never see the half-written round, the
    database is consistent, and the import runs again once the dead one's round is stale."""
    url, project_id = labeled_db
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"id": f"b{i}", "prompt": f"question {i}", "responses": ["yes", "no"]}) + "\n"
                           for i in range(40_000)))
    command = [sys.executable, "-m", "rlhfkit.cli", "label", "import", str(big), "--project", "big", "--db", url]
    server = server_process(url)
    stop = threading.Event()
    try:
        clients = [login(server.url, f"ann{i:02d}") for i in range(4)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(annotate, c, project_id, 25, stop) for c in clients]
            importer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and _staged_items(url, "big")[0] == 0 and importer.poll() is None:
                time.sleep(0.05)
            importer.send_signal(signal.SIGKILL)
            importer.wait(timeout=10)
            results = [f.result(timeout=60) for f in futures]
        staged, published = _staged_items(url, "big")
        assert 0 < staged < 40_000 and published == 0, "the kill did not land mid-import"
        ann = clients[0]
        assert re.search(r"<h2>big</h2>\s*<p[^>]*>0 labeled by you · 0 items in the project", ann.get("/projects").text)
        big_id = _project_id(url, "big")
        assert ann.post(f"/api/p/{big_id}/next").json()["item"] is None
        for c in clients:
            c.close()
    finally:
        server.stop()
    acknowledged = [vote for result in results for vote in result]
    assert len(acknowledged) == 100
    assert {ack["vote_id"] for ack in acknowledged} <= set(stored_votes(url))
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []

    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "is already in a round still being imported" in again.stderr
    database = open_database(url)
    with database.write() as session:  # as if STALE_STAGING had passed
        session.execute(update(Round).where(Round.number < 0).values(created_at=utcnow() - STALE_STAGING))
        session.commit()
    database.close()
    third = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert _staged_items(url, "big") == (0, 40_000)
