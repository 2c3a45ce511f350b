"""The write transactions of one process take turns on a lock of their own before SQLite's
(whose busy handler polls with sleeps of up to 100 ms): a second writer does not ask SQLite for
the write lock while the first holds it, and gets it as soon as the first commits."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import event, select

from rlhfkit.feedback.models import User
from rlhfkit.feedback.users import create_user

sqlite_only = pytest.mark.skipif(bool(os.environ.get("RLHFKIT_TEST_DATABASE_URL")), reason="checks SQLite locking")


@sqlite_only
def test_a_second_writer_waits_for_the_first_and_starts_when_it_ends(database):
    first_inside, begins, commits, began, ends = threading.Event(), {}, {}, {}, {}

    @event.listens_for(database.engine, "before_cursor_execute")
    def spy(conn, cursor, statement, *args):
        if statement.startswith("BEGIN IMMEDIATE"):
            begins[threading.current_thread().name] = time.monotonic()

    def write(name: str, hold_s: float) -> None:
        if name == "second":
            first_inside.wait()
        with database.write() as session:
            create_user(session, name, "velvet otter 42", "annotator")
            session.flush()  # BEGIN IMMEDIATE: the write lock from here to the commit
            began[name] = time.monotonic()
            first_inside.set()
            time.sleep(hold_s)
            commits[name] = time.monotonic()
            session.commit()
            ends[name] = time.monotonic()

    threads = [threading.Thread(target=write, args=(n, hold), name=n) for n, hold in (("first", 0.3), ("second", 0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # not sent to SQLite (and its busy handler's growing sleeps) while the first held the lock;
    # sent when the first commits (the lock is handed on at COMMIT, whose fsync the second may
    # still wait for in SQLite: a few ms), and through as soon as the first is done
    assert begins["second"] >= commits["first"]
    assert began["second"] - ends["first"] < 0.1
    with database.read() as session:
        assert set(session.scalars(select(User.username))) >= {"first", "second"}
