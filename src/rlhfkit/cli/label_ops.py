"""`rlhf label backup / restore / audit`: keeping a labeling database safe and accountable.

Also what every `rlhf label` command shares: the `--db` option and reading a moment in time
(`--since`, `--as-of`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session

from rlhfkit.cli.errors import fail
from rlhfkit.data.errors import DataError
from rlhfkit.feedback import audit, pg_backup
from rlhfkit.feedback.backup import backup, check_sqlite_file, in_use, is_postgresql, local_file, restore, sqlite_file
from rlhfkit.feedback.db import DEFAULT_DATABASE, Database, open_database
from rlhfkit.feedback.migrations import SchemaError

DB_OPTION = typer.Option(DEFAULT_DATABASE, "--db", envvar="RLHFKIT_FEEDBACK_DB",
                         help="Database URL (sqlite:///file.db, postgresql://...) or a SQLite file path.")
T = TypeVar("T")
_AGE = re.compile(r"(\d+)([mhd])")
_AGE_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def in_transaction(db: str, change: Callable[[Session], T]) -> T:
    """Run `change` in one write transaction; a DataError becomes one `error:` line."""
    database = open_database(db)
    try:
        with database.write() as session:
            result = change(session)
            session.commit()
            return result
    except DataError as e:
        fail(e.message)
    finally:
        database.close()


def parse_moment(text: str, option: str) -> datetime:
    """An ISO 8601 time (UTC unless it names a zone; a bare date is its midnight) or an age
    before now ("45m", "12h", "7d"), as an aware UTC datetime; a one-line error otherwise."""
    value = text.strip()
    age = _AGE.fullmatch(value)
    if age:
        return datetime.now(UTC) - timedelta(**{_AGE_UNITS[age.group(2)]: int(age.group(1))})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option} {text!r}: not a time; give ISO 8601 (2026-12-06, 2026-12-06T18:30, UTC unless "
             "a zone is given) or an age (45m, 12h, 7d)")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def open_existing(db: str) -> Database:
    """`open_database` for a command that only reads or copies: a SQLite file that is not
    there is an error, not a new empty database; a schema newer than this code is one line."""
    path = local_file(db)
    if path is not None:
        check_sqlite_file(path)
    try:
        return open_database(db)
    except SchemaError as e:
        fail(str(e))


def backup_command(dest: Path = typer.Argument(..., help="File to write the copy to."),
                   db: str = DB_OPTION,
                   force: bool = typer.Option(False, "--force", help="Replace DEST if it exists.")) -> None:
    """Copy a labeling database, consistently, while the server keeps running.

    Example: `rlhf label backup backups/feedback-$(date +%F).db --db feedback.db`
    A PostgreSQL database is dumped with pg_dump (custom format) into DEST, e.g.
    `rlhf label backup backups/rlhf-$(date +%F).dump --db postgresql+psycopg://user@host/rlhf`
    """
    if is_postgresql(db):
        _pg_backup(dest.expanduser(), db, force)
        return
    source = sqlite_file(db, command="backup")
    check_sqlite_file(source)
    dest = dest.expanduser()
    if dest.exists() and not dest.is_dir() and dest.resolve() == source.resolve():
        fail(f"{dest} is the database itself: give another file")
    _check_dest(dest, force, source.name)
    database = open_existing(db)
    try:
        result = backup(database, dest)
        _audit_backup(database, dest, result.size_bytes, result.schema_version)
    finally:
        database.close()
    typer.echo(f"backed up {source} to {dest}: {result.size_bytes / 2**20:.1f} MiB, schema version "
               f"{result.schema_version}, integrity check ok ({result.seconds:.1f} s)")


def _audit_backup(database: Database, dest: Path, size_bytes: int, schema_version: int) -> None:
    with database.write() as session:
        audit.record(session, audit.CLI, "backup", f"file:{dest.resolve()}", bytes=size_bytes,
                     schema_version=schema_version)
        session.commit()


def _check_dest(dest: Path, force: bool, name: str) -> None:
    if dest.is_dir():
        fail(f"{dest} is a folder: give the backup's file name, e.g. {dest / name}")
    if not dest.parent.is_dir():
        fail(f"{dest.parent}: no such folder")
    if dest.exists() and not force:
        fail(f"{dest} exists: pass --force to replace it")


def _pg_backup(dest: Path, db: str, force: bool) -> None:
    conn = pg_backup.connection(db)
    _check_dest(dest, force, f"{conn.name}.dump")
    result = pg_backup.backup(db, dest)
    database = open_existing(db)
    try:
        _audit_backup(database, dest, result.size_bytes, result.schema_version)
    finally:
        database.close()
    typer.echo(f"backed up {conn.shown} to {dest} with pg_dump: {result.size_bytes / 2**20:.1f} MiB, "
               f"data of {result.tables} tables, schema version {result.schema_version}, pg_restore --list ok "
               f"({result.seconds:.1f} s)")


def _pg_restore(src: Path, db: str, force: bool) -> None:
    result = pg_backup.restore(src, db, force=force)
    database = open_existing(db)  # an older backup is upgraded to this version here
    try:
        with database.write() as session:
            audit.record(session, audit.CLI, "restore", f"file:{src.resolve()}", schema_version=result.schema_version,
                         replaced=None if result.replaced is None else str(result.replaced))
            session.commit()
    finally:
        database.close()
    kept = f"; the previous database is kept as {result.replaced}" if result.replaced else ""
    typer.echo(f"restored {src} into {result.database} with pg_restore (schema version "
               f"{result.schema_version}){kept}")
    if force:
        typer.secho("warning: restart `rlhf label serve` if it was running", fg="yellow", err=True)


def restore_command(src: Path = typer.Argument(..., help="A backup made by `rlhf label backup`."),
                    db: str = DB_OPTION,
                    force: bool = typer.Option(False, "--force", help="Replace the database even though it "
                                               "looks open (a running server keeps writing to the old file).")
                    ) -> None:
    """Put a backup in place of the database; the database it replaces is kept beside it.

    Example: `rlhf label restore backups/feedback-2026-12-01.db --db feedback.db`
    (stop `rlhf label serve` first). A PostgreSQL database takes a pg_dump archive, put back with
    `pg_restore --clean --single-transaction`; the database it replaces is dumped beside SRC.
    """
    if is_postgresql(db):
        _pg_restore(src.expanduser(), db, force)
        return
    target = sqlite_file(db, command="restore")
    was_open = in_use(target) is not None
    result = restore(src.expanduser(), target, force=force)
    database = open_existing(str(target))  # an older backup is upgraded to this version here
    try:
        with database.write() as session:
            audit.record(session, audit.CLI, "restore", f"file:{src.expanduser().resolve()}",
                         schema_version=result.schema_version,
                         replaced=None if result.replaced is None else str(result.replaced))
            session.commit()
    finally:
        database.close()
    kept = f"; the previous database is kept as {result.replaced}" if result.replaced else ""
    typer.echo(f"restored {src} into {target} (schema version {result.schema_version}){kept}")
    if was_open:
        typer.secho("warning: the database was open: restart `rlhf label serve`, it still holds the replaced "
                    "file", fg="yellow", err=True)


def audit_command(since: str | None = typer.Option(None, "--since", help="Only entries from this time on: "
                                                   "ISO 8601 (UTC) or an age such as 12h or 7d."),
                  limit: int = typer.Option(50, "--limit", min=1, help="The newest N entries at most."),
                  as_json: bool = typer.Option(False, "--json", help="JSON Lines instead of a table."),
                  db: str = DB_OPTION) -> None:
    """Show the audit log of admin actions and exports: who, what, when (oldest first).

    Accounts and projects created, rounds imported, claims released, exports, backups, restores.

    Example: `rlhf label audit --since 7d --db feedback.db`
    """
    start = parse_moment(since, "--since") if since else None
    database = open_existing(db)
    try:
        with database.read() as session:
            entries = list(reversed(audit.latest(session, since=start, limit=limit)))
            names = audit.actor_names(session, entries)
    finally:
        database.close()
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(audit.as_json(entry, names[entry.actor]), ensure_ascii=False))
        return
    table = Table("at (UTC)", "who", "action", "target", "detail")
    for e in entries:  # Text(...): names and details are shown as typed, never as rich markup
        table.add_row(audit.when(e).strftime("%Y-%m-%d %H:%M:%S"), Text(names[e.actor]), Text(e.action),
                      Text(e.target), Text(json.dumps(e.detail, ensure_ascii=False, sort_keys=True)))
    if not entries:
        typer.echo("no audit entries" + (f" since {start:%Y-%m-%d %H:%M:%S} UTC" if start else ""))
        return
    Console(soft_wrap=False).print(table)


def add_commands(group: typer.Typer) -> None:
    group.command("backup")(backup_command)
    group.command("restore")(restore_command)
    group.command("audit")(audit_command)
