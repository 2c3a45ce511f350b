"""`rlhf label backup` / `restore` on PostgreSQL, through pg_dump and pg_restore: a round trip, a
dump of a live database while annotators vote, a killed backup that harms nothing, one-line
errors. The server tests run when RLHFKIT_TEST_DATABASE_URL names a PostgreSQL server (see
.ci/postgres-tests); the URL, magic-byte and error tests need no server and always run.

The dump of a small test database takes well under a second, too fast to kill mid-way by
timing. So the tests hold `LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE` (a table voting never
touches): pg_dump takes its snapshot, then waits for that lock, visibly, in pg_stat_activity;
the backup is killed (or let go) while it waits, and annotators go on voting meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from rlhfkit.cli import app as cli_app
from rlhfkit.data.errors import DataError
from rlhfkit.feedback import pg_backup
from rlhfkit.feedback.db import open_database

URL = os.environ.get("RLHFKIT_TEST_DATABASE_URL", "")
needs_pg = pytest.mark.skipif(not URL.startswith("postgresql"),
                              reason="needs RLHFKIT_TEST_DATABASE_URL naming a PostgreSQL server")
FAKE = "postgresql+psycopg://u:secret@db.invalid:5432/rlhf"  # never connected to
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
ITEMS = [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(200)]


# ------------------------------------------------------------------------------ no server needed
def test_connection_is_a_libpq_url_without_the_password():
    conn = pg_backup.connection(FAKE)
    assert conn.url == "postgresql://u@db.invalid:5432/rlhf"
    assert conn.shown == "postgresql://u:***@db.invalid:5432/rlhf"
    assert conn.env["PGPASSWORD"] == "secret" and conn.name == "rlhf"
    assert pg_backup.connection("postgresql://u@h/db").env.get("PGPASSWORD") == os.environ.get("PGPASSWORD")


def test_the_password_goes_by_environment_and_a_failing_tool_is_its_last_stderr_line(monkeypatch, tmp_path):
    calls = []

    def fake_run(args, env=None, **_):
        calls.append((args, env))
        return subprocess.CompletedProcess(args, 1, "", "pg_dump: error: first\npg_dump: error: the last line\n")

    monkeypatch.setattr(pg_backup, "find_tool", lambda name: f"/opt/pg/bin/{name}")
    monkeypatch.setattr(pg_backup.subprocess, "run", fake_run)
    with pytest.raises(DataError) as e:
        pg_backup.backup(FAKE, tmp_path / "x.dump")
    assert str(e.value) == "pg_dump failed (exit 1): pg_dump: error: the last line"
    ((args, env),) = calls
    assert args[:3] == ["/opt/pg/bin/pg_dump", "--format=custom", "--file"]
    assert args[-1] == "postgresql://u@db.invalid:5432/rlhf" and "secret" not in " ".join(args)
    assert env["PGPASSWORD"] == "secret"
    assert list(tmp_path.iterdir()) == []  # no partial, no dest


def test_find_tool_takes_the_newest_versioned_folder(monkeypatch, tmp_path):
    for version in ("9.6", "13", "15"):
        folder = tmp_path / version / "bin"
        folder.mkdir(parents=True)
        (folder / "pg_dump").write_text("#!/bin/sh\n")
        (folder / "pg_dump").chmod(0o755)
    monkeypatch.setattr(pg_backup.shutil, "which", lambda name: None)
    monkeypatch.setattr(pg_backup, "TOOL_DIRS", str(tmp_path / "*" / "bin"))
    assert pg_backup.find_tool("pg_dump") == str(tmp_path / "15" / "bin" / "pg_dump")


def test_magic_bytes(tmp_path):
    (tmp_path / "good.dump").write_bytes(pg_backup.PG_MAGIC + b"\x01\x0e\x00rest")
    pg_backup.check_archive(tmp_path / "good.dump")
    (tmp_path / "notes.txt").write_text("PGDM but not quite\n")
    open_database(str(tmp_path / "lite.db")).close()
    for name, fragment in (("notes.txt", "not a pg_dump custom archive"), ("lite.db", "is a SQLite backup"),
                           ("missing.dump", "no such backup file")):
        with pytest.raises(DataError, match=fragment):
            pg_backup.check_archive(tmp_path / name)


@pytest.mark.parametrize(("command", "fragment"), [
    (["restore", "notes.txt", "--db", FAKE], "notes.txt: not a pg_dump custom archive"),
    (["restore", "lite.db", "--db", FAKE], "lite.db: is a SQLite backup, not a PostgreSQL one"),
    (["restore", "fake.dump", "--db", "new.db"], "fake.dump: is a PostgreSQL backup (pg_dump archive)"),
    (["backup", "out.dump", "--db", FAKE], "pg_dump not found: install the PostgreSQL client tools "
                                           "(Debian/Ubuntu: apt-get install postgresql-client)"),
    (["restore", "fake.dump", "--db", FAKE], "pg_restore not found"),
    (["backup", "adir", "--db", FAKE], "adir is a folder: give the backup's file name, e.g. adir/rlhf.dump"),
])
def test_cli_errors_are_one_line(command, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pg_backup.shutil, "which", lambda name: None)  # and no versioned folder: no tools
    monkeypatch.setattr(pg_backup, "TOOL_DIRS", str(tmp_path / "none" / "*" / "bin"))
    (tmp_path / "adir").mkdir()
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "fake.dump").write_bytes(pg_backup.PG_MAGIC + b"\x01\x0e\x00")
    open_database("lite.db").close()
    result = runner.invoke(cli_app, ["label", *command])
    lines = [line for line in result.output.splitlines() if "error:" in line]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert fragment in " ".join(result.output.split()), result.output
    assert "secret" not in result.output
    assert not (tmp_path / "new.db").exists() and not (tmp_path / "out.dump").exists()


# ------------------------------------------------------------------------- a PostgreSQL server
def dumped_votes(path: Path) -> set[int]:
    """The vote ids in a pg_dump archive (its COPY data, through pg_restore)."""
    out = subprocess.run([pg_backup.find_tool("pg_restore"), "--data-only", "--table=votes", "--file=-", str(path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("COPY public.votes "))
    column = out[start].split("(", 1)[1].split(")", 1)[0].split(", ").index("id")
    rows = out[start + 1:out.index("\\.", start)]
    return {int(row.split("\t")[column]) for row in rows}


def live_votes(database) -> set[int]:
    with database.engine.connect() as conn:
        return {row[0] for row in conn.execute(text("SELECT id FROM votes"))}


def contents(database) -> dict[str, list[tuple]]:
    with database.engine.connect() as conn:
        return {table: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]
                for table in ("votes", "users", "projects", "items")}


def voter(client, headers, project_id, acknowledged, stop):
    while not stop.is_set():
        item = client.post(f"/api/p/{project_id}/next", headers=headers).json()["item"]
        if item is None:
            return
        answer = client.post(f"/api/p/{project_id}/items/{item['item_id']}/vote", headers=headers,
                             json={"choice": "A"})
        assert answer.status_code == 200
        acknowledged.append((time.monotonic(), answer.json()["vote_id"]))


class Voting:
    """Three annotators voting through the app in threads until `stop()`."""

    def __init__(self, app, login, api_headers, project_id):
        self.acknowledged: list[tuple[float, int]] = []
        self.event = threading.Event()
        clients = [login(app, f"ann{i}") for i in (1, 2, 3)]  # log in first: concurrent logins stall
        self.threads = [threading.Thread(target=voter, args=(c, api_headers(c), project_id, self.acknowledged,
                                                             self.event)) for c in clients]
        for t in self.threads:
            t.start()

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + 30
        while len(self.acknowledged) < n:
            assert time.monotonic() < deadline, "the annotators are not voting"
            time.sleep(0.01)

    def stop(self) -> set[int]:
        self.event.set()
        for t in self.threads:
            t.join(timeout=30)
        return {vote_id for _, vote_id in self.acknowledged}


class AuditLock:
    """Holds ACCESS EXCLUSIVE on audit_log (which voting never touches) until `release()`:
    pg_dump, having taken its snapshot, waits for it."""

    def __init__(self):
        self.engine = create_engine(URL, poolclass=NullPool)
        self.conn = self.engine.connect()
        self.conn.execute(text("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE"))

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()
        self.engine.dispose()


def pg_dump_backends(state: str) -> int:
    engine = create_engine(URL, poolclass=NullPool)
    with engine.connect() as conn:
        where = " AND wait_event_type = 'Lock'" if state == "waiting" else ""
        n = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_dump'"
                              + where)).scalar_one()
    engine.dispose()
    return n


def processes_naming(word: str) -> list[int]:
    """Processes with `word` in their command line (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if word in cmdline.read_bytes().decode(errors="replace").replace("\0", " "):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return found


def wait_until(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@needs_pg
def test_backup_then_restore_round_trip(database, seed, app, login, api_headers, tmp_path):
    project_id = seed(database, annotators=("ann1", "ann2", "ann3"), records=ITEMS[:20])
    voting = Voting(app, login, api_headers, project_id)
    voting.wait_for(10)
    voting.stop()
    before = contents(database)
    dest = tmp_path / "rlhf.dump"
    result = runner.invoke(cli_app, ["label", "backup", str(dest), "--db", URL])
    assert result.exit_code == 0, result.output
    assert "with pg_dump" in result.output and "pg_restore --list ok" in result.output
    assert dest.read_bytes()[:5] == b"PGDMP" and not (tmp_path / "rlhf.dump.partial").exists()
    taken = runner.invoke(cli_app, ["label", "backup", str(dest), "--db", URL])
    assert taken.exit_code == 2 and "exists: pass --force" in taken.output

    with database.write() as session:  # what the restore must undo
        session.execute(text("TRUNCATE votes CASCADE"))
        session.execute(text("UPDATE projects SET name = 'changed'"))
        session.execute(text("DELETE FROM users WHERE username = 'ann2'"))
        session.commit()
    assert contents(database) != before

    refused = runner.invoke(cli_app, ["label", "restore", str(dest), "--db", URL])  # the app's pool is open
    assert refused.exit_code == 2 and "looks in use" in refused.output and "--force" in refused.output
    database.close()
    result = runner.invoke(cli_app, ["label", "restore", str(dest), "--db", URL])
    assert result.exit_code == 0, result.output
    (replaced,) = tmp_path.glob("*.replaced-*.dump")
    assert str(replaced) in " ".join(result.output.split())
    assert contents(database) == before
    assert dumped_votes(replaced) == set()  # the database as it was before the restore, kept
    with database.engine.connect() as conn:
        actions = [r[0] for r in conn.execute(text("SELECT action FROM audit_log ORDER BY id"))]
    assert actions[-1] == "restore"


@needs_pg
def test_backup_while_annotators_vote_has_every_vote_acknowledged_before_it(
        database, seed, app, login, api_headers, tmp_path):
    project_id = seed(database, annotators=("ann1", "ann2", "ann3"), overlap=3, records=ITEMS)
    voting = Voting(app, login, api_headers, project_id)
    voting.wait_for(20)
    lock = AuditLock()
    threading.Timer(1.5, lock.release).start()  # the dump waits 1.5 s, annotators voting meanwhile
    started = time.monotonic()
    result = pg_backup.backup(URL, tmp_path / "live.dump")
    finished = time.monotonic()
    voting.stop()
    before = {vote_id for at, vote_id in voting.acknowledged if at < started}
    during = [vote_id for at, vote_id in voting.acknowledged if started < at < finished]
    dumped = dumped_votes(result.path)
    assert during, "no vote landed while the dump ran"
    assert before <= dumped  # every vote acknowledged before the dump started is in it
    assert dumped <= live_votes(database)  # and nothing is invented
    assert result.tables >= 10 and result.size_bytes > 0 and not (tmp_path / "live.dump.partial").exists()


@needs_pg
def test_sigkill_mid_backup_loses_no_vote_and_leaves_no_dest(database, seed, app, login, api_headers, tmp_path):
    project_id = seed(database, annotators=("ann1", "ann2", "ann3"), overlap=3, records=ITEMS)
    voting = Voting(app, login, api_headers, project_id)
    voting.wait_for(10)
    dest = tmp_path / "killed.dump"
    lock = AuditLock()
    try:
        process = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "label", "backup", str(dest), "--db", URL],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: pg_dump_backends("waiting") == 1, "pg_dump did not start")
        voted_before_kill = len(voting.acknowledged)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        # pg_dump dies with its parent (its backend, waiting for the lock, only notices later)
        wait_until(lambda: not processes_naming(f"{dest}.partial"), "pg_dump outlived `rlhf label backup`",
                   timeout=10)
    finally:
        lock.release()
    wait_until(lambda: pg_dump_backends("any") == 0, "pg_dump's backend did not end", timeout=10)
    voting.wait_for(voted_before_kill + 10)  # voting goes on
    acknowledged = voting.stop()

    assert not dest.exists()
    assert acknowledged <= live_votes(database)  # no acknowledged vote lost
    result = runner.invoke(cli_app, ["label", "backup", str(dest), "--db", URL])
    assert result.exit_code == 0, result.output
    assert dest.exists() and not (tmp_path / "killed.dump.partial").exists()  # the next backup cleans up
    assert acknowledged <= dumped_votes(dest)
