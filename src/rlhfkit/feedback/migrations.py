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

from sqlalchemy import Column, Connection, DateTime, Engine, Integer, MetaData, String, Table, inspect, select, text

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


# version v -> the step that upgrades a database at version v - 1 to v.
UPGRADES: Mapping[int, Upgrade] = {2: _v2_claim_leases_and_username_keys}
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
