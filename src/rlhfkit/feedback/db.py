"""Opening the database: SQLite by default (one file), PostgreSQL by URL.

SQLite is set up so that an acknowledged vote survives a crash and concurrent annotators
never see "database is locked":

- `journal_mode=WAL`: readers do not block the writer, and a commit is one append;
- `synchronous=FULL`: the WAL is fsynced at every commit, so a vote acknowledged to the
  browser is on disk even if the server is killed (or the machine loses power) right after;
- write transactions start with `BEGIN IMMEDIATE`: they take the write lock first, so two
  requests that read-then-write queue on `busy_timeout` instead of one of them failing
  with SQLITE_BUSY when it tries to upgrade a stale read snapshot;
- `foreign_keys=ON`, which SQLite leaves off by default;
- the write transactions of one process wait their turn in a first-come-first-served queue
  of their own (`WritersQueue`), taken at `BEGIN IMMEDIATE` and handed to the next writer at
  COMMIT or ROLLBACK (the span of SQLite's write lock). SQLite's busy handler polls with
  sleeps that grow to 100 ms, so a request that has waited a while loses the lock, each time
  it frees, to one that has just arrived: under 50 voting annotators a few votes waited
  seconds for a lock held a few ms at a time. Writers of other processes (`rlhf label import`)
  still meet the busy handler, one writer of this process at a time.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.feedback.migrations import migrate

DEFAULT_DATABASE = "sqlite:///rlhfkit-feedback.db"
SQLITE_BUSY_TIMEOUT_S = 30.0
# How many times background work (an import's chunks) waits `SQLITE_BUSY_TIMEOUT_S` for the
# write lock before it gives up: a request fails after one wait, an import after several.
LOCKED_TRIES = 6

_HOLDS_TURN = "rlhfkit_holds_writers_turn"
log = logging.getLogger(__name__)
T = TypeVar("T")


class WritersQueue:
    """A lock handed to its waiters in the order they came (`threading.Lock` lets a thread that
    just arrived take the lock a waiter was woken for). Not owned by a thread: a transaction
    may end in another thread than the one it began in."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiting: deque[threading.Lock] = deque()
        self._held = False

    def acquire(self, timeout: float) -> bool:
        """Wait for this caller's turn, at most `timeout` seconds; whether it came."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        if turn.acquire(timeout=timeout):
            return True
        with self._mutex:
            if turn in self._waiting:
                self._waiting.remove(turn)
                return False
        return True  # handed over just as the wait ran out

    def release(self) -> None:
        """The next waiter's turn (the lock passes to it without ever being free)."""
        with self._mutex:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._held = False


def database_url(db: str) -> str:
    """A URL as given, or a plain file path turned into a SQLite URL."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy (the "begin" hook below) emit BEGIN instead of the sqlite3 module,
        # which would otherwise start transactions late and always DEFERRED.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    writers = WritersQueue()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        if mode == "IMMEDIATE":
            # past the busy timeout (a transaction left open?) go on to SQLite's own wait
            connection.info[_HOLDS_TURN] = writers.acquire(timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            connection.exec_driver_sql(f"BEGIN {mode}")
        except BaseException:
            _on_end(connection)
            raise

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _on_end(connection) -> None:
        if connection.info.pop(_HOLDS_TURN, False):
            writers.release()


@dataclass(frozen=True)
class Database:
    """An engine and the two kinds of session the app uses."""

    engine: Engine
    reader: sessionmaker[Session]
    writer: sessionmaker[Session]

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session for a transaction that writes: committed by the caller."""
        with self.writer() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.reader() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def is_locked(error: OperationalError) -> bool:
    """SQLite's "database is locked": the write lock was not free within the busy timeout."""
    return "database is locked" in str(error.orig)


def retry_locked(work: Callable[[], T], *, tries: int = LOCKED_TRIES, what: str = "write") -> T:
    """Run `work` (one whole transaction: it opens, writes and commits its own session) again
    when SQLite times out waiting for the write lock, up to `tries` times. For background
    writes only (a request answers its client instead of waiting minutes): a timed-out
    transaction wrote nothing, so running it again is safe."""
    for attempt in range(1, tries + 1):
        try:
            return work()
        except OperationalError as e:
            if not is_locked(e) or attempt == tries:
                raise
            log.warning("%s waited %.0f s for the write lock; trying again (%d of %d)",
                        what, SQLITE_BUSY_TIMEOUT_S, attempt + 1, tries)
    raise AssertionError("unreachable")


def open_database(db: str = DEFAULT_DATABASE, *, upgrade: bool = True) -> Database:
    """Connect to `db` (a URL or a SQLite file path) and bring its schema up to date."""
    url = make_url(database_url(db))
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ValueError("use a SQLite file, not an in-memory database: votes must survive a restart")
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False,
                                                  "timeout": SQLITE_BUSY_TIMEOUT_S},
                               pool_size=10, max_overflow=20)
        _configure_sqlite(engine)
        write_engine = engine.execution_options(sqlite_begin="IMMEDIATE")
    else:
        engine = create_engine(url, pool_pre_ping=True)
        write_engine = engine
    if upgrade:
        migrate(engine)
    return Database(
        engine=engine,
        reader=sessionmaker(engine, expire_on_commit=False),
        writer=sessionmaker(write_engine, expire_on_commit=False),
    )
