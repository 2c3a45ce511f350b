"""The write transactions of one process take turns in a first-come-first-served queue before
SQLite's write lock (whose busy handler polls with sleeps of up to 100 ms): a second writer does
not ask SQLite for the lock while the first holds it, and gets it as soon as the first commits."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import event, select

from rlhfkit.feedback.db import WritersQueue
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


def test_the_writers_queue_serves_waiters_in_the_order_they_came():
    """Five threads queue behind a held turn, one after another; each release hands the turn
    to the longest-waiting one, and a thread arriving at a release does not jump the queue."""
    queue = WritersQueue()
    assert queue.acquire(timeout=1)
    order: list[int] = []

    def waiter(n: int) -> None:
        assert queue.acquire(timeout=10)
        order.append(n)
        time.sleep(0.01)
        queue.release()

    threads = []
    for n in range(5):
        threads.append(threading.Thread(target=waiter, args=(n,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(queue._waiting) < n + 1 and time.monotonic() < deadline:  # queued before the next starts
            time.sleep(0.001)
    queue.release()
    late = threading.Thread(target=waiter, args=(99,))  # arrives while the five take their turns
    late.start()
    for t in [*threads, late]:
        t.join(timeout=10)
    assert order == [0, 1, 2, 3, 4, 99]
    assert queue.acquire(timeout=0.1)  # free again once everyone is through


def test_a_wait_that_runs_out_leaves_the_queue():
    queue = WritersQueue()
    assert queue.acquire(timeout=1)
    started = time.monotonic()
    assert not queue.acquire(timeout=0.05)
    assert time.monotonic() - started >= 0.05
    queue.release()  # no waiter left: the turn is free, not handed to the one that gave up
    assert queue.acquire(timeout=0.1)
