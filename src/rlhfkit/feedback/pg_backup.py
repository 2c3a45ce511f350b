"""Backups of a PostgreSQL labeling database, made and put back by PostgreSQL's own tools.

`backup` runs `pg_dump --format=custom` (one REPEATABLE READ snapshot, taken when the dump
starts: every vote acknowledged before it is in the dump, and annotators keep voting meanwhile)
into `<dest>.partial`, fsyncs it, reads it back with `pg_restore --list` and only then renames
it onto DEST. A killed backup leaves DEST as it was; pg_dump dies with it (Linux: the parent
death signal), and the next backup to that DEST removes the `.partial`.

`restore` checks the file (a pg_dump custom archive with a labeling schema no newer than this
code), refuses while other clients are connected to the database unless forced (the
equivalent of the SQLite file's -wal/-shm check: a running `rlhf label serve` holds
connections), keeps the database it replaces (when it holds a labeling schema) as a pg_dump
archive beside the backup file (`<db name>.replaced-<UTC time>.dump`), then runs `pg_restore --clean --if-exists
--single-transaction --no-owner`: all of it or, on any error, nothing. Objects the archive does
not hold (tables of a newer schema) are left as they are.

The password never appears on a command line or in a message: the tools get it in PGPASSWORD.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.backup import PG_MAGIC, SQLITE_MAGIC, file_head, fsync_path, publish_file
from rlhfkit.feedback.db import database_url
from rlhfkit.feedback.migrations import SCHEMA_VERSION

TOOL_DIRS = "/usr/lib/postgresql/*/bin"  # Debian/Ubuntu's versioned client tools
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Connection:
    url: str    # libpq URL without the password, for the tools' command lines
    shown: str  # the same, for messages
    env: dict[str, str]  # the tools' environment, with PGPASSWORD when the URL has a password
    name: str   # the database name


@dataclass(frozen=True)
class PgBackupResult:
    path: Path
    size_bytes: int
    tables: int  # table-data entries in the archive
    seconds: float
    schema_version: int


@dataclass(frozen=True)
class PgRestoreResult:
    database: str
    replaced: Path | None  # the database as it was, dumped beside the backup; None when it was empty
    schema_version: int


def connection(db: str) -> Connection:
    """The libpq form of a SQLAlchemy URL (`postgresql+psycopg://...` → `postgresql://...`)."""
    url = make_url(database_url(db)).set(drivername="postgresql")
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    bare = url._replace(password=None)  # URL.set(password=None) keeps the password
    return Connection(url=bare.render_as_string(hide_password=False),
                      shown=url.render_as_string(hide_password=True), env=env, name=url.database or "")


def find_tool(name: str) -> str:
    """`name` on PATH, else in the newest /usr/lib/postgresql/<version>/bin; a one-line error."""
    found = shutil.which(name)
    if found:
        return found

    def version(folder: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", Path(folder).parent.name))

    for folder in sorted(glob.glob(TOOL_DIRS), key=version, reverse=True):
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    raise DataError(f"{name} not found: install the PostgreSQL client tools "
                    "(Debian/Ubuntu: apt-get install postgresql-client)")


def check_archive(path: Path) -> None:
    """A one-line DataError unless `path` is a pg_dump custom-format archive."""
    head = file_head(path, "backup")
    if head.startswith(SQLITE_MAGIC):
        raise DataError("is a SQLite backup, not a PostgreSQL one: restore it into a SQLite database "
                        "(--db feedback.db)", path=str(path))
    if not head.startswith(PG_MAGIC):
        raise DataError("not a pg_dump custom archive (made by `rlhf label backup` or "
                        "`pg_dump --format=custom`)", path=str(path))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _run(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run a PostgreSQL tool; its stdout, or a one-line DataError with its last stderr line."""
    done = subprocess.run(args, env=env, capture_output=True, text=True, preexec_fn=_die_with_parent,
                          check=False)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise DataError(f"{Path(args[0]).name} failed (exit {done.returncode}): "
                        f"{lines[-1] if lines else 'no message'}")
    return done.stdout


def archive_schema_version(pg_restore: str, path: Path) -> int:
    """The labeling schema version stored in the archive; a DataError when it has none or it
    is newer than this code."""
    dump = _run([pg_restore, "--data-only", "--table=schema_version", "--file=-", str(path)])
    lines = dump.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("COPY ") and "schema_version" in line), None)
    if start is None or start + 1 >= len(lines) or not lines[start + 1].strip().isdigit():
        raise DataError("a pg_dump archive but not of a labeling database (no schema version)", path=str(path))
    version = int(lines[start + 1].strip())
    if version > SCHEMA_VERSION:
        raise DataError(f"schema version {version} is newer than this rlhfkit ({SCHEMA_VERSION}); upgrade rlhfkit",
                        path=str(path))
    return version


def backup(db: str, dest: Path) -> PgBackupResult:
    """`pg_dump --format=custom` of the database `db` to `dest` (replacing it), checked with
    `pg_restore --list` before it is renamed into place."""
    conn = connection(db)
    pg_dump, pg_restore = find_tool("pg_dump"), find_tool("pg_restore")
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)  # what a killed backup left
    started = time.monotonic()
    try:
        _run([pg_dump, "--format=custom", "--file", str(partial), conn.url], conn.env)
        fsync_path(partial)
        listing = _run([pg_restore, "--list", str(partial)])
        version = archive_schema_version(pg_restore, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    publish_file(partial, dest)
    tables = sum(1 for line in listing.splitlines() if not line.startswith(";") and " TABLE DATA " in line)
    return PgBackupResult(path=dest, size_bytes=dest.stat().st_size, tables=tables,
                          seconds=time.monotonic() - started, schema_version=version)


def inspect(db: str) -> tuple[int, bool]:
    """Client connections to the database other than this one (a running server's pool), and
    whether it holds a labeling schema (an empty database has nothing to keep)."""
    engine = create_engine(make_url(database_url(db)), poolclass=NullPool)
    try:
        with engine.connect() as c:
            others = c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")).scalar_one()
            labeling = c.execute(text("SELECT to_regclass('schema_version') IS NOT NULL")).scalar_one()
            return others, labeling
    finally:
        engine.dispose()


def restore(src: Path, db: str, *, force: bool = False) -> PgRestoreResult:
    """Put the archive `src` in place of the PostgreSQL database `db` (see the module doc)."""
    check_archive(src)
    conn = connection(db)
    pg_restore = find_tool("pg_restore")
    find_tool("pg_dump")
    version = archive_schema_version(pg_restore, src)
    busy, labeling = inspect(db)
    if busy and not force:
        raise DataError(f"the database looks in use ({busy} other connection{'s' if busy > 1 else ''}): "
                        "stop `rlhf label serve` first, or pass --force", path=conn.shown)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = src.parent / f"{conn.name or 'database'}.replaced-{stamp}.dump"
    replaced = backup(db, aside).path if labeling else None
    _run([pg_restore, "--clean", "--if-exists", "--single-transaction", "--no-owner",
          "--dbname", conn.url, str(src)], conn.env)
    return PgRestoreResult(database=conn.shown, replaced=replaced, schema_version=version)
