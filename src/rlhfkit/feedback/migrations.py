"""Schema versions: a one-row `schema_version` table and an ordered list of upgrades.

A new database is created from the ORM models (`models.py`) and stamped with the latest
version. An older database is upgraded by running, in one transaction, every step
between its version and the latest. A database newer than this code is refused rather than
guessed at.

To change the schema: edit `models.py` and add to `UPGRADES` the step that
brings a database of the previous version to the new one, e.g.

    def _v2_add_vote_duration(conn: Connection) -> None:
        conn.execute(text("ALTER TABLE votes ADD COLUMN duration_ms INTEGER"))

    UPGRADES = {2: _v2_add_vote_duration}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
    text,
)

from rlhfkit.feedback.models import Base, username_key

Upgrade = Callable[[Connection], None]


def _v2_claim_leases_and_username_keys(conn: Connection) -> None:
    """Claims get a lease; usernames get their case-insensitive unique key.

    Claims made before the upgrade count as expired (their holder can still answer while the
    item has room); answered assignments hold their item for good (no lease). When two old
    usernames share a key, the later account's key gets '#id' appended: it still logs in with
    its exact name."""
    timestamp = DateTime(timezone=True).compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE assignments ADD COLUMN lease_expires_at {timestamp}"))
    conn.execute(text("UPDATE assignments SET lease_expires_at = created_at WHERE NOT EXISTS (SELECT 1 FROM votes "
                      "WHERE votes.item_id = assignments.item_id AND votes.user_id = assignments.user_id)"))
    conn.execute(text(f"ALTER TABLE users ADD COLUMN username_key {String(255).compile(dialect=conn.dialect)}"))
    seen: set[str] = set()
    for user_id, username in conn.execute(text("SELECT id, username FROM users ORDER BY id")).all():
        key = username_key(username)
        key = f"{key}#{user_id}" if key in seen else key
        seen.add(key)
        conn.execute(text("UPDATE users SET username_key = :key WHERE id = :id"), {"key": key, "id": user_id})
    conn.execute(text("CREATE UNIQUE INDEX ix_users_username_key ON users (username_key)"))


def _v3_session_idle_and_project_members(conn: Connection) -> None:
    """Login sessions get `last_seen_at` (for the idle timeout; set to now, so an upgrade
    logs nobody out); projects get `open_to_all` and the `project_members` table. Every
    project that exists at the upgrade is made open to all annotators: what it was before.
    Each part is skipped when already there (a database stamped older by hand in tests)."""
    stamp = DateTime(timezone=True)
    columns = {table: {c["name"] for c in inspect(conn).get_columns(table)} for table in ("login_sessions", "projects")}
    if "last_seen_at" not in columns["login_sessions"]:
        conn.execute(text(f"ALTER TABLE login_sessions ADD COLUMN last_seen_at {stamp.compile(dialect=conn.dialect)}"))
        conn.execute(text("CREATE INDEX ix_login_sessions_last_seen_at ON login_sessions (last_seen_at)"))
        conn.execute(text("CREATE INDEX ix_login_sessions_expires_at ON login_sessions (expires_at)"))
    conn.execute(text("UPDATE login_sessions SET last_seen_at = :now"), {"now": datetime.now(UTC)})
    if "open_to_all" not in columns["projects"]:
        conn.execute(text("ALTER TABLE projects ADD COLUMN open_to_all BOOLEAN NOT NULL DEFAULT FALSE"))
    conn.execute(text("UPDATE projects SET open_to_all = TRUE"))
    metadata = MetaData()
    for referenced in ("users", "projects"):  # only so that the foreign keys resolve
        Table(referenced, metadata, Column("id", Integer, primary_key=True))
    Table("project_members", metadata,
          Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
          Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True),
          ).create(conn, checkfirst=True)


def _v4_audit_log_and_vote_history(conn: Connection) -> None:
    """The audit log of admin actions and exports, and the versions of votes that edits
    replaced or undos deleted (both start empty: nothing before the upgrade was recorded).
    The tables are spelled out as they were at version 4, not taken from models.py, which
    may have moved on; `checkfirst` leaves a table that is already there alone."""
    metadata = MetaData()
    for referenced in ("items", "users", "projects"):  # only so that the foreign keys resolve
        Table(referenced, metadata, Column("id", Integer, primary_key=True))
    stamp = DateTime(timezone=True)
    audit = Table("audit_log", metadata,
                  Column("id", Integer, primary_key=True), Column("at", stamp, nullable=False, index=True),
                  Column("actor", String(64), nullable=False), Column("action", String(64), nullable=False, index=True),
                  Column("target", String(500), nullable=False), Column("detail", JSON, nullable=False))
    history = Table("vote_history", metadata,
                    Column("id", Integer, primary_key=True), Column("vote_id", Integer, nullable=False, index=True),
                    *(Column(f"{name}_id", Integer, ForeignKey(f"{name}s.id", ondelete="CASCADE"),
                             nullable=False, index=True) for name in ("item", "user", "project")),
                    Column("ranks", JSON, nullable=False), Column("both_bad", Boolean, nullable=False),
                    Column("strength", Integer), Column("rationale", Text),
                    Column("display_order", JSON, nullable=False),
                    Column("valid_from", stamp, nullable=False), Column("replaced_at", stamp, nullable=False),
                    Column("reason", String(16), nullable=False))
    audit.create(conn, checkfirst=True)
    history.create(conn, checkfirst=True)


def _v5_unique_item_ids(conn: Connection) -> None:
    """An imported id names one item of its project: a unique index on
    items (project_id, external_id). Databases filled before imports refused repeated ids may
    hold an id several times: the first (lowest row id) keeps it and every later one is renamed
    `<id>#<row id>`, the name the export already gave it."""
    repeats = conn.execute(text(
        "SELECT i.id, i.project_id, i.external_id FROM items i WHERE i.external_id IS NOT NULL AND EXISTS ("
        "SELECT 1 FROM items j WHERE j.project_id = i.project_id AND j.external_id = i.external_id "
        "AND j.id < i.id) ORDER BY i.id")).all()
    for row_id, project_id, external_id in repeats:
        new_id, n = f"{external_id}#{row_id}", 1
        while conn.execute(text("SELECT 1 FROM items WHERE project_id = :p AND external_id = :e"),
                           {"p": project_id, "e": new_id}).first():
            n += 1  # an imported id that happens to read `<id>#<row id>` already
            new_id = f"{external_id}#{row_id}.{n}"
        conn.execute(text("UPDATE items SET external_id = :e WHERE id = :id"), {"e": new_id, "id": row_id})
    conn.execute(text("CREATE UNIQUE INDEX IF NOT EXISTS ux_items_project_external_id "
                      "ON items (project_id, external_id)"))


def _v6_items_in_round_order(conn: Connection) -> None:
    """An index on items (round_id, position): the next item to claim is found walking a
    round's items in order instead of sorting the whole project's at every claim."""
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_items_round_position ON items (round_id, position)"))


# version v -> the step that upgrades a database at version v - 1 to v.
UPGRADES: Mapping[int, Upgrade] = {2: _v2_claim_leases_and_username_keys,
                                   3: _v3_session_idle_and_project_members,
                                   4: _v4_audit_log_and_vote_history,
                                   5: _v5_unique_item_ids,
                                   6: _v6_items_in_round_order}
SCHEMA_VERSION = max(UPGRADES)

_version_metadata = MetaData()
schema_version_table = Table("schema_version", _version_metadata, Column("version", Integer, nullable=False))


class SchemaError(RuntimeError):
    """The database cannot be used by this version of rlhfkit."""


def current_version(conn: Connection) -> int | None:
    if not inspect(conn).has_table("schema_version"):
        return None
    return conn.execute(select(schema_version_table.c.version)).scalar_one_or_none()


def migrate(engine: Engine, *, upgrades: Mapping[int, Upgrade] = UPGRADES,
            latest: int = SCHEMA_VERSION) -> int:
    """Create or upgrade the schema; returns the version the database is now at."""
    # IMMEDIATE on SQLite: two servers started at once on one file must not both create it.
    with engine.execution_options(sqlite_begin="IMMEDIATE").begin() as conn:
        version = current_version(conn)
        if version is None:
            if set(inspect(conn).get_table_names()) & set(Base.metadata.tables):
                raise SchemaError("the database has labeling tables but no schema_version row; "
                                  "it was not created by rlhfkit")
            _version_metadata.create_all(conn)
            Base.metadata.create_all(conn)
            conn.execute(schema_version_table.insert().values(version=latest))
            return latest
        if version > latest:
            raise SchemaError(f"the database is at schema version {version}, newer than this "
                              f"rlhfkit ({latest}); upgrade rlhfkit")
        for step in range(version + 1, latest + 1):
            if step not in upgrades:
                raise SchemaError(f"no upgrade step to schema version {step}")
            upgrades[step](conn)
            conn.execute(schema_version_table.update().values(version=step))
        return latest
