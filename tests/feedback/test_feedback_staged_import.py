"""Issue #16, finding 4: a large import is staged, written in chunks and published at once
(feedback/imports.py), so it never holds the write lock for its whole run and annotators never
see half a round."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from rlhfkit.data.errors import DataError
from rlhfkit.feedback import imports
from rlhfkit.feedback.assignment import has_work
from rlhfkit.feedback.db import retry_locked
from rlhfkit.feedback.export import export_records
from rlhfkit.feedback.models import Item, Project, Round, User, utcnow
from rlhfkit.feedback.projects import RoundRecords, add_round, insert_items, item_count
from rlhfkit.feedback.quality import round_progress

RECORDS = [{"id": f"i{n}", "prompt": f"q{n}", "responses": ["a", "b"]} for n in range(7)]
sqlite_only = pytest.mark.skipif(bool(os.environ.get("RLHFKIT_TEST_DATABASE_URL")), reason="checks SQLite locking")


def _rounds(database) -> list[int]:
    with database.read() as session:
        return sorted(session.scalars(select(Round.number)))


def test_a_round_appears_whole_when_published(database, seed):
    project = _project_after_seed(database, seed)
    seen = {}

    def check_unpublished(session, new_round):
        # the items are committed, chunk by chunk; nobody outside the import sees them yet
        with database.read() as other:
            target = other.get(Project, project.id)
            ann = other.scalar(select(User).where(User.username == "ann1"))
            seen["items written"] = other.scalar(select(func.count(Item.id)).where(Item.round_id == new_round.id))
            seen["items shown"] = item_count(other, project.id)
            seen["rounds shown"] = [r.number for r in round_progress(other, target, 2)]
            seen["work"] = has_work(other, target, ann)
            seen["exported"] = len(export_records(other, target, format="rankings"))

    published = imports.import_round(database, project.id, RECORDS, chunk=3, on_publish=check_unpublished)
    assert seen == {"items written": 7, "items shown": 0, "rounds shown": [], "work": False, "exported": 0}
    assert published.number == 1
    with database.read() as session:
        assert item_count(session, project.id) == 7
        assert [i.external_id for i in session.scalars(select(Item).where(Item.round_id == published.id)
                                                       .order_by(Item.position))] == [r["id"] for r in RECORDS]


def _project_after_seed(database, seed):
    seed(database, records=[{"prompt": "x", "responses": ["a", "b"]}])
    with database.write() as session:  # an empty project to import into
        session.add(Project(name="big", overlap=1, open_to_all=True))
        session.commit()
    with database.read() as session:
        return session.scalar(select(Project).where(Project.name == "big"))


@sqlite_only
def test_the_write_lock_is_free_between_chunks(database, seed, monkeypatch):
    project = _project_after_seed(database, seed)
    free_between_chunks = []
    real_insert = imports.insert_items

    def insert_and_probe(session, target, batch, start, stop):
        if start:  # a chunk after the first: the previous one has committed
            probe = sqlite3.connect(database.engine.url.database, timeout=0.05, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("COMMIT")
                free_between_chunks.append(True)
            except sqlite3.OperationalError:
                free_between_chunks.append(False)
            finally:
                probe.close()
        real_insert(session, target, batch, start, stop)

    monkeypatch.setattr(imports, "insert_items", insert_and_probe)
    imports.import_round(database, project.id, RECORDS, chunk=2)
    assert free_between_chunks == [True, True, True]


def test_a_failed_import_leaves_nothing(database, seed, monkeypatch):
    project = _project_after_seed(database, seed)
    calls = []

    def fail_on_second_chunk(session, target, batch, start, stop):
        calls.append(start)
        if start:
            raise OSError("disk full")
        insert_items(session, target, batch, start, stop)

    monkeypatch.setattr(imports, "insert_items", fail_on_second_chunk)
    with pytest.raises(OSError):
        imports.import_round(database, project.id, RECORDS, chunk=3)
    assert calls == [0, 3]
    assert _rounds(database) == [1]  # the seeded project's round only
    with database.read() as session:
        assert session.scalar(select(func.count(Item.id)).where(Item.project_id == project.id)) == 0


def _locked() -> OperationalError:
    return OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))


def test_a_chunk_that_times_out_on_the_write_lock_is_written_again(database, seed, monkeypatch):
    """Under heavy load a chunk's BEGIN IMMEDIATE can wait out the busy timeout; the import
    tries that chunk again (it wrote nothing) instead of failing after minutes of work."""
    project = _project_after_seed(database, seed)
    calls = []

    def locked_once(session, target, batch, start, stop):
        calls.append(start)
        if start == 3 and calls.count(3) == 1:
            raise _locked()
        insert_items(session, target, batch, start, stop)

    monkeypatch.setattr(imports, "insert_items", locked_once)
    published = imports.import_round(database, project.id, RECORDS, chunk=3)
    assert calls == [0, 3, 3, 6]
    with database.read() as session:
        assert sorted(session.scalars(select(Item.external_id).where(Item.round_id == published.id))) == \
            sorted(r["id"] for r in RECORDS)


def test_retry_locked_gives_up_after_its_tries_and_never_retries_other_errors():
    attempts = []

    def always_locked():
        attempts.append(1)
        raise _locked()

    with pytest.raises(OperationalError):
        retry_locked(always_locked, tries=3)
    assert len(attempts) == 3

    def other_error():
        attempts.append(2)
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: items"))

    with pytest.raises(OperationalError):
        retry_locked(other_error, tries=3)
    assert attempts.count(2) == 1


def test_an_id_written_meanwhile_by_another_import_is_one_error_line(database, seed, monkeypatch):
    project = _project_after_seed(database, seed)
    real_insert = imports.insert_items

    def another_import_first(session, target, batch, start, stop):
        if start == 0:  # after this import's check, another writes id i4
            add_round_elsewhere(database, project.id, [{"id": "i4", "prompt": "z", "responses": ["a", "b"]}])
        real_insert(session, target, batch, start, stop)

    monkeypatch.setattr(imports, "insert_items", another_import_first)
    with pytest.raises(DataError) as err:
        imports.import_round(database, project.id, RECORDS, chunk=3, source="big.jsonl")
    assert str(err.value) == "big.jsonl:5: field 'id': id 'i4' is already in round 1 of project 'big'"
    with database.read() as session:
        assert session.scalar(select(func.count(Item.id)).where(Item.project_id == project.id)) == 1


def add_round_elsewhere(database, project_id: int, records) -> None:
    with database.write() as session:
        add_round(session, session.get(Project, project_id), records)
        session.commit()


def test_a_killed_import_is_cleared_by_the_next_one(database, seed):
    project = _project_after_seed(database, seed)
    # what a SIGKILL between chunks leaves: a staged round with some items
    with database.write() as session:
        staged = Round(project_id=project.id, number=-1)
        session.add(staged)
        session.flush()
        insert_items(session, staged, RoundRecords.parse(RECORDS[:2]), 0, 2)
        session.commit()
        staged_id = staged.id
    with pytest.raises(DataError, match="id 'i0' is already in a round still being imported"):
        imports.import_round(database, project.id, RECORDS, source="again.jsonl")  # too recent to be abandoned
    with database.write() as session:
        session.execute(update(Round).where(Round.id == staged_id)
                        .values(created_at=utcnow() - imports.STALE_STAGING - timedelta(seconds=1)))
        session.commit()
    assert imports.import_round(database, project.id, RECORDS).number == 1
    with database.read() as session:
        assert list(session.scalars(select(Round.number).where(Round.project_id == project.id))) == [1]
        assert item_count(session, project.id) == 7
        assert session.scalar(select(func.count(Item.id)).where(Item.project_id == project.id)) == 7


@sqlite_only
@pytest.mark.timeout(150)
def test_voters_keep_voting_through_a_large_import_and_a_login_flood():
    """tests/feedback/import_load.py, bounded: 4 annotators vote through the API while one
    thread floods the login form and `rlhf label import` writes 10k items into another
    project of the same database; no vote fails and every acknowledged one is exported."""
    script = Path(__file__).with_name("import_load.py")
    result = subprocess.run([sys.executable, str(script), "--voters", "4", "--flood-threads", "1",
                             "--import-items", "10000", "--think-seconds", "0"], capture_output=True, text=True,
                            timeout=140)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["import"]["ok"], numbers
    assert numbers["vote_errors"] == 0 and numbers["acked_missing"] == 0, numbers
    assert numbers["votes_during_import"] > 0, numbers
