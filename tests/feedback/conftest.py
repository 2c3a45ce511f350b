"""Shared fixtures for the labeling app: a fresh SQLite file per test, seeded accounts and a
project, and TestClients logged in as a given user."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, open_database
from rlhfkit.feedback.models import ADMIN, ANNOTATOR
from rlhfkit.feedback.projects import add_round, create_project
from rlhfkit.feedback.users import create_user

PASSWORD = "correct horse battery"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')

PAIR_RECORDS = [
    {"id": "p1", "prompt": "What is 2+2?", "responses": ["4", "5"], "model_version": "sft-v1"},
    {"id": "p2", "prompt": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Capital of France?"}],
     "responses": ["Paris", "Lyon"]},
]
RANK_RECORDS = [
    {"id": "r1", "prompt": "Name a colour.", "responses": ["red", "blue", "green", "not a colour"]},
]


def csrf_from(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "page has no CSRF token"
    return match.group(1)


@dataclass
class Seeded:
    database: Database
    project_id: int


# Set to a PostgreSQL URL to run the database tests there instead of on a SQLite file
# (e.g. postgresql+psycopg://user:pw@127.0.0.1/rlhf); every table in it is dropped first.
TEST_DATABASE_URL = os.environ.get("RLHFKIT_TEST_DATABASE_URL")


def _empty_database(url: str) -> Database:
    from sqlalchemy import create_engine

    from rlhfkit.feedback.migrations import schema_version_table
    from rlhfkit.feedback.models import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    schema_version_table.drop(engine, checkfirst=True)
    engine.dispose()
    return open_database(url)


# Tests hash passwords at scrypt N=2^10 instead of 2^17 (a few ms instead of ~0.4 s each);
# test_feedback_hardening checks the production cost, and that old hashes are upgraded.
TEST_SCRYPT_N = 2**10


@pytest.fixture(autouse=True)
def fast_password_hashing(monkeypatch):
    from rlhfkit.feedback import security

    monkeypatch.setattr(security, "SCRYPT_N", TEST_SCRYPT_N)


@pytest.fixture
def database(tmp_path) -> Database:
    db = _empty_database(TEST_DATABASE_URL) if TEST_DATABASE_URL else open_database(str(tmp_path / "feedback.db"))
    yield db
    db.close()


def seed_project(database: Database, *, annotators=("ann1", "ann2"), overlap: int = 2,
         records=PAIR_RECORDS + RANK_RECORDS, model_version: str | None = "sft-v1", guidelines: str = "",
         open_to_all: bool = True) -> int:
    """An admin 'admin', the given annotators, and one project with one round (open to all
    annotators unless told otherwise); the project id."""
    with database.write() as session:
        create_user(session, "admin", PASSWORD, ADMIN)
        for name in annotators:
            create_user(session, name, PASSWORD, ANNOTATOR)
        project = create_project(session, "demo", overlap=overlap, guidelines_md=guidelines, open_to_all=open_to_all)
        add_round(session, project, records, model_version)
        session.commit()
        return project.id


@pytest.fixture
def seeded(database) -> Seeded:
    return Seeded(database, seed_project(database))


@pytest.fixture
def app(database):
    return create_app(database)


def login_client(app, username: str, password: str = PASSWORD) -> TestClient:
    """A client with its own cookie jar, logged in through the real login form."""
    client = TestClient(app, follow_redirects=False)
    page = client.get("/login")
    response = client.post("/login", data={"username": username, "password": password,
                                            "csrf_token": csrf_from(page.text)})
    assert response.status_code == 303, response.text
    return client


def api_csrf(client: TestClient) -> dict[str, str]:
    return {"X-CSRF-Token": client.get("/api/me").json()["csrf_token"]}


def claim_next(client: TestClient, project_id: int):
    """Press "Start labeling" (POST /p/N/label) and follow to the page it leads to: the item
    now claimed, or the end of the queue."""
    token = client.get("/api/me").json()["csrf_token"]
    return client.post(f"/p/{project_id}/label", data={"csrf_token": token}, follow_redirects=True)


STARTUP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m rlhfkit.cli label serve` on a free loopback port."""

    def __init__(self, db_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rlhfkit.cli", "label", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--db", str(db_path), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.stderr.close()



@pytest.fixture(scope="session")
def server_process():
    """The class that starts `rlhf label serve` on a free loopback port: `server_process(db_path)`."""
    return ServerProcess


# The helpers as fixtures, so test modules need not import this file.
@pytest.fixture
def seed():
    return seed_project


@pytest.fixture
def login():
    return login_client


@pytest.fixture
def csrf():
    return csrf_from


@pytest.fixture
def api_headers():
    return api_csrf


@pytest.fixture
def claim():
    """claim_next(client, project_id) as a fixture: the page after "Start labeling"."""
    return claim_next


# ---------------------------------------------------------------------------- headless Chromium
CHROMIUM = Path("/usr/bin/chromium")   # Debian's; Playwright never downloads a browser here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BROWSER_TIMEOUT_MS = 15_000


@pytest.fixture(scope="session")
def chromium():
    """`with chromium() as browser:` headless Chromium driven by Playwright (each launch with a
    fresh temporary --user-data-dir of its own); skips the test without Chromium or Playwright."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (.ci/install-browser.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install playwright)")

    @contextmanager
    def launch():
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()

    return launch


def new_page(browser, **context):
    """A page in a new browser context (its own cookies), 1280×860, with the tests' timeout."""
    page = browser.new_context(viewport={"width": 1280, "height": 860}, **context).new_page()
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    return page


def browser_log_in(page, base: str, username: str, password: str = PASSWORD) -> None:
    page.goto(f"{base}/login")
    page.fill("#username", username)
    page.fill("#password", password)
    with page.expect_navigation():
        page.keyboard.press("Enter")


@pytest.fixture(scope="session")
def browser_page():
    """new_page(browser, **context_options) as a fixture."""
    return new_page


@pytest.fixture(scope="session")
def log_in():
    """browser_log_in(page, base_url, username) as a fixture: the login form, by keyboard."""
    return browser_log_in

