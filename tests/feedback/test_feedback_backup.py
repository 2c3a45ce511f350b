"""`rlhf label backup` / `restore`: a consistent copy of a live SQLite database while
annotators vote, a killed backup that harms nothing, a restore round trip, one-line errors."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from rlhfkit.cli import app as cli_app
from rlhfkit.feedback import backup as backup_module
from rlhfkit.feedback.db import open_database

pytestmark = pytest.mark.skipif(bool(os.environ.get("RLHFKIT_TEST_DATABASE_URL")), reason="SQLite files only")
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
ITEMS = [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(60)]


def vote_ids(path: Path) -> set[int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {row[0] for row in conn.execute("SELECT id FROM votes")}
    finally:
        conn.close()


def voter(client, headers, project_id, acknowledged, stop):
    while not stop.is_set():
        item = client.post(f"/api/p/{project_id}/next", headers=headers).json()["item"]
        if item is None:
            return
        answer = client.post(f"/api/p/{project_id}/items/{item['item_id']}/vote", headers=headers,
                             json={"choice": "A"})
        assert answer.status_code == 200
        acknowledged.append((time.monotonic(), answer.json()["vote_id"]))


def test_backup_while_annotators_vote_has_every_vote_acknowledged_before_it(
        database, seed, app, login, api_headers, tmp_path, monkeypatch):
    project_id = seed(database, annotators=("ann1", "ann2", "ann3"), overlap=3, records=ITEMS)
    acknowledged: list[tuple[float, int]] = []
    stop = threading.Event()
    clients = [login(app, f"ann{i}") for i in (1, 2, 3)]  # log in first: concurrent TestClient logins stall
    threads = [threading.Thread(target=voter, args=(c, api_headers(c), project_id, acknowledged, stop))
               for c in clients]
    for t in threads:
        t.start()
    while len(acknowledged) < 20:
        time.sleep(0.01)
    monkeypatch.setattr(backup_module, "STEP_PAGES", 4)  # several steps, with votes landing between them
    steps = []
    started = time.monotonic()
    result = backup_module.backup(database, tmp_path / "copy.db",
                                  progress=lambda *_: (steps.append(len(acknowledged)), time.sleep(0.02)))
    stop.set()
    for t in threads:
        t.join(timeout=30)
    before = {vote_id for at, vote_id in acknowledged if at < started}
    copied = vote_ids(result.path)
    assert len(steps) > 3 and steps[-1] > steps[0], "no vote landed while the copy ran"
    assert before <= copied  # nothing acknowledged before the backup is missing
    assert copied <= vote_ids(Path(database.engine.url.database))  # and nothing is invented
    assert not (tmp_path / "copy.db.partial").exists() and not (tmp_path / "copy.db-wal").exists()


KILLED_BACKUP = """
import sys, time
from pathlib import Path
from rlhfkit.feedback import backup
from rlhfkit.feedback.db import open_database
backup.STEP_PAGES = 1
def slow(status, remaining, total):
    print("step", remaining, flush=True)
    time.sleep(0.2)
backup.backup(open_database(sys.argv[1]), Path(sys.argv[2]), progress=slow)
"""


def test_sigkill_mid_backup_leaves_the_source_intact_and_no_dest(database, seed, tmp_path):
    seed(database, records=ITEMS)
    source = Path(database.engine.url.database)
    dest = tmp_path / "copy.db"
    process = subprocess.Popen([sys.executable, "-c", KILLED_BACKUP, str(source), str(dest)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("step"), "the backup did not start copying"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    process.stdout.close()

    assert not dest.exists()
    assert (tmp_path / "copy.db.partial").exists()  # the half-written temporary file, nothing else
    conn = sqlite3.connect(source)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == len(ITEMS)
    conn.close()
    result = runner.invoke(cli_app, ["label", "backup", str(dest), "--db", str(source)])
    assert result.exit_code == 0, result.output
    assert "integrity check ok" in result.output
    assert dest.exists() and not (tmp_path / "copy.db.partial").exists()  # the next backup cleans it up


def test_restore_round_trip_keeps_the_replaced_database(database, seed, tmp_path):
    seed(database, records=ITEMS)
    source = Path(database.engine.url.database)
    copy = tmp_path / "copy.db"
    assert runner.invoke(cli_app, ["label", "backup", str(copy), "--db", str(source)]).exit_code == 0
    with database.write() as session:
        session.execute(text("DELETE FROM items"))
        session.commit()

    refused = runner.invoke(cli_app, ["label", "restore", str(copy), "--db", str(source)])
    assert refused.exit_code == 2 and "looks in use" in refused.output and "--force" in refused.output
    database.close()  # the server stops: its -wal/-shm go away
    result = runner.invoke(cli_app, ["label", "restore", str(copy), "--db", str(source)])
    assert result.exit_code == 0, result.output
    (replaced,) = tmp_path.glob("feedback.db.replaced-*")
    assert str(replaced) in " ".join(result.output.split())
    restored = open_database(str(source))
    with restored.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM items")).scalar_one() == len(ITEMS)
        actions = [r[0] for r in conn.execute(text("SELECT action FROM audit_log ORDER BY id"))]
    restored.close()
    assert actions[-1] == "restore"  # the log of the restored file, plus the restore itself
    conn = sqlite3.connect(replaced)
    assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 0  # the replaced data, kept
    conn.close()


@pytest.mark.parametrize(("command", "make", "fragment"), [
    (["backup", "adir", "--db", "postgresql://u:secret@host/db"], None, "adir is a folder"),  # pg: see _pg tests
    (["restore", "in.db", "--db", "postgresql://u:secret@host/db"], None, "in.db: no such backup file"),
    (["backup", "out.db", "--db", "mysql://u:secret@host/db"], None, "handles SQLite files and PostgreSQL"),
    (["backup", "out.db", "--db", "missing.db"], None, "missing.db: no such database file"),
    (["backup", "out.db", "--db", "notes.txt"], "notes", "notes.txt: not a SQLite database file"),
    (["backup", "adir", "--db", "live.db"], "live", "adir is a folder"),
    (["backup", "taken.db", "--db", "live.db"], "live", "taken.db exists: pass --force"),
    (["backup", "live.db", "--db", "live.db"], "live", "is the database itself"),
    (["restore", "missing.db", "--db", "new.db"], None, "missing.db: no such database file"),
    (["restore", "notes.txt", "--db", "new.db"], "notes", "notes.txt: not a SQLite database file"),
    (["restore", "other.db", "--db", "new.db"], "other", "not a labeling database"),
    (["restore", "future.db", "--db", "new.db"], "future", "newer than this rlhfkit"),
])
def test_cli_errors_are_one_line(command, make, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "taken.db").write_text("x")
    if make == "notes":
        (tmp_path / "notes.txt").write_text("hello\n")
    if make == "live":
        open_database("live.db").close()
    if make == "other":
        sqlite3.connect("other.db").execute("CREATE TABLE t (x)").connection.close()
    if make == "future":
        open_database("future.db").close()
        conn = sqlite3.connect("future.db")
        conn.execute("UPDATE schema_version SET version = 999")
        conn.commit()
        conn.close()
    result = runner.invoke(cli_app, ["label", *command])
    lines = [line for line in result.output.splitlines() if "error:" in line]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert fragment in " ".join(result.output.split()), result.output
    assert "secret" not in result.output
    assert not (tmp_path / "new.db").exists() and not (tmp_path / "out.db").exists()
