"""Copies of a live SQLite labeling database, and putting one back.

`backup` copies with SQLite's online backup API through the server's own kind of connection
(WAL, busy timeout). The copy runs inside one read transaction: in WAL mode that is one
snapshot of the database, taken when the copy starts, while annotators go on voting (a
reader never blocks the writer, and the backup never restarts because of their commits).
Every vote acknowledged before the backup started is in the copy; none is half in it.

The copy is written to `<dest>.partial`, set to a single self-contained file (rollback
journal, no -wal), fsynced, checked with `PRAGMA integrity_check`, and only then renamed
onto DEST: a backup killed at any point leaves DEST as it was (at most a `.partial`, removed
by the next backup to that DEST) and the source untouched, since the source is only read.

`restore` checks the file first (SQLite, integrity, a labeling schema no newer than this
code), refuses to replace a database a process has open unless forced, and keeps the file it
replaces (with its -wal/-shm) as `<db>.replaced-<UTC time>`.

A PostgreSQL database is backed up and restored by PostgreSQL's own tools (`pg_dump
--format=custom`, `pg_restore`) with the same publish discipline: see `pg_backup`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from sqlalchemy.engine import make_url

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.db import Database, database_url
from rlhfkit.feedback.migrations import SCHEMA_VERSION

SQLITE_MAGIC = b"SQLite format 3\x00"
PG_MAGIC = b"PGDMP"  # the first bytes of a pg_dump custom-format archive
STEP_PAGES = 4096  # pages per backup step (16 MiB at 4 KiB pages); steps only pace the progress callback
SIDE_FILES = ("-wal", "-shm", "-journal")

Progress = Callable[[int, int, int], object]  # sqlite3's (status, remaining pages, total pages)


@dataclass(frozen=True)
class BackupResult:
    path: Path
    pages: int
    size_bytes: int
    seconds: float
    schema_version: int


@dataclass(frozen=True)
class RestoreResult:
    path: Path
    replaced: Path | None
    schema_version: int


def local_file(db: str) -> Path | None:
    """The SQLite file a URL or path names, or None for a database server (PostgreSQL)."""
    url = make_url(database_url(db))
    if url.get_backend_name() != "sqlite":
        return None
    if url.database in (None, "", ":memory:"):
        raise DataError("give a SQLite file, not an in-memory database", field="db")
    return Path(url.database)


def is_postgresql(db: str) -> bool:
    return make_url(database_url(db)).get_backend_name() == "postgresql"


def sqlite_file(db: str, *, command: str) -> Path:
    """The file behind a SQLite URL or path; another server's URL (not SQLite, not PostgreSQL)
    is refused in one line that names `command` ("backup" or "restore")."""
    path = local_file(db)
    if path is None:
        url = make_url(database_url(db))
        raise DataError(f"{url.render_as_string(hide_password=True)} is a {url.get_backend_name()} database: "
                        f"rlhf label {command} handles SQLite files and PostgreSQL databases")
    return path


def file_head(path: Path, kind: str) -> bytes:
    """The first bytes of the file `path` (enough for SQLite's and pg_dump's magic); a one-line
    DataError naming `kind` ("database", "backup") when it is missing or a folder."""
    if not path.exists():
        raise DataError(f"no such {kind} file", path=str(path))
    if not path.is_file():
        raise DataError(f"is a folder, not a {kind} file", path=str(path))
    with open(path, "rb") as f:
        return f.read(len(SQLITE_MAGIC))


def check_sqlite_file(path: Path) -> None:
    """A one-line DataError unless `path` is an existing SQLite database file."""
    head = file_head(path, "database")
    if head.startswith(PG_MAGIC):
        raise DataError("is a PostgreSQL backup (pg_dump archive), not a SQLite one: restore it into a "
                        "PostgreSQL database (--db postgresql+psycopg://user@host/db)", path=str(path))
    if head != SQLITE_MAGIC:
        raise DataError("not a SQLite database file", path=str(path))


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove_partial(partial: Path) -> None:
    for suffix in ("", *SIDE_FILES):
        _side(partial, suffix).unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(source: sqlite3.Connection, target_path: Path, progress: Progress | None) -> None:
    """Backup API from `source` into a new file: one step per STEP_PAGES pages, then a plain
    rollback-journal file (no -wal beside it), closed and fsynced."""
    target = sqlite3.connect(target_path, isolation_level=None)
    try:
        source.backup(target, pages=STEP_PAGES, progress=progress)
        target.execute("PRAGMA journal_mode=DELETE")
    finally:
        target.close()
    fsync_path(target_path)


def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection. Without a -wal beside the file nobody is writing it, and
    `immutable` keeps SQLite from leaving -wal/-shm files next to a backup it only read."""
    immutable = "" if _side(path, "-wal").exists() else "&immutable=1"
    return sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro{immutable}", uri=True)


def _check_copy(path: Path) -> int:
    """The schema version of the copy at `path`; a DataError when it fails `integrity_check`
    or is not a labeling database this code can open."""
    conn = _read_only(path)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise DataError(f"integrity check failed: {problems[0]}", path=str(path))
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone() is None:
            raise DataError("a SQLite file but not a labeling database (no schema_version table)", path=str(path))
        row = conn.execute("SELECT version FROM schema_version").fetchone()
    finally:
        conn.close()
    if row is None:
        raise DataError("a labeling database without a schema version row", path=str(path))
    if row[0] > SCHEMA_VERSION:
        raise DataError(f"schema version {row[0]} is newer than this rlhfkit ({SCHEMA_VERSION}); upgrade rlhfkit",
                        path=str(path))
    return row[0]


def publish_file(partial: Path, dest: Path) -> None:
    """Rename the finished copy onto `dest` (atomic) and make the rename durable."""
    os.replace(partial, dest)
    fsync_path(dest.parent)


def _snapshot_copy(database: Database, partial: Path, progress: Progress | None) -> None:
    raw = database.engine.raw_connection()
    try:
        source = raw.driver_connection
        # One read transaction around every step: a single WAL snapshot for the whole copy.
        source.execute("BEGIN")
        source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        try:
            _copy(source, partial, progress)
        finally:
            source.execute("ROLLBACK")
    finally:
        raw.close()


def backup(database: Database, dest: Path, *, progress: Progress | None = None) -> BackupResult:
    """Copy the open SQLite `database` to `dest` (replacing it) as one consistent snapshot."""
    partial = _side(dest, ".partial")
    _remove_partial(partial)  # what a killed backup left
    started = time.monotonic()
    try:
        _snapshot_copy(database, partial, progress)
        version = _check_copy(partial)
    except BaseException:
        _remove_partial(partial)
        raise
    publish_file(partial, dest)
    size = dest.stat().st_size
    return BackupResult(path=dest, pages=size // _page_size(dest), size_bytes=size,
                        seconds=time.monotonic() - started, schema_version=version)


def _page_size(path: Path) -> int:
    with open(path, "rb") as f:
        header = f.read(18)
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


def in_use(db_path: Path) -> Path | None:
    """The -wal or -shm file beside `db_path`, when there is one: in WAL mode SQLite keeps them
    while any connection is open (a running `rlhf label serve`) and removes them when the last
    one closes; after a crash they stay until the database is opened again."""
    return next((p for p in (_side(db_path, "-wal"), _side(db_path, "-shm")) if p.exists()), None)


def restore(src: Path, db_path: Path, *, force: bool = False) -> RestoreResult:
    """Put the backup `src` in place of the SQLite database at `db_path`.

    `src` is copied next to `db_path` first and checked there (integrity, schema); the current
    database, if any, is moved aside, not deleted. Refused while the database looks open
    (see `in_use`) unless `force`: a server still holding it would keep writing to the file
    moved aside."""
    check_sqlite_file(src)
    if src.resolve() == db_path.resolve():
        raise DataError("is the database itself; give a backup file", path=str(src))
    busy = in_use(db_path)
    if busy is not None and not force:
        raise DataError(f"the database looks in use ({busy.name} exists): stop `rlhf label serve` first, "
                        "or pass --force", path=str(db_path))
    partial = _side(db_path, ".restoring")
    _remove_partial(partial)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    source = _read_only(src)
    try:
        _copy(source, partial, None)
    except sqlite3.DatabaseError as e:
        _remove_partial(partial)
        raise DataError(f"cannot be read as a database ({e})", path=str(src)) from None
    finally:
        source.close()
    try:
        version = _check_copy(partial)
    except DataError as e:
        _remove_partial(partial)
        raise DataError(e.message, path=str(src)) from None
    replaced = _move_aside(db_path) if db_path.exists() else None
    publish_file(partial, db_path)
    return RestoreResult(path=db_path, replaced=replaced, schema_version=version)


def _move_aside(db_path: Path) -> Path:
    """Rename the database and its -wal/-shm to `<db>.replaced-<UTC time>` (+ the same
    suffixes, so the set still opens as one database)."""
    aside = _side(db_path, ".replaced-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ"))
    for suffix in ("", "-wal", "-shm"):
        if _side(db_path, suffix).exists():
            os.replace(_side(db_path, suffix), _side(aside, suffix))
    return aside
