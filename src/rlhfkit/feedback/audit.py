"""The audit log: who did what to the labeling data, and when.

Every admin action (accounts, projects, rounds, claims, settings) and every export adds one
row with `record`, in the same transaction as the action: the action and its row commit
together or not at all. Exports only read, so theirs is a short write of its own, committed
before any exported data leaves (an export whose row cannot be written is not delivered).

    audit.record(session, admin, "user.create", f"user:{name}", role="annotator")

`actor` is a `User` (stored by id) or `CLI` for a command run on the server's machine (the
operating-system account is added to the detail). The detail holds plain JSON values; never
put a password or a token in it.
"""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhfkit.feedback.models import AuditEntry, User, utcnow

CLI = "cli"


def _actor_key(actor: User | str) -> str:
    return str(actor.id) if isinstance(actor, User) else actor


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        return None


def record(session: Session, actor: User | str, action: str, target: str = "", **detail: Any) -> AuditEntry:
    """Add the audit row for `action` on `target` to the caller's transaction (flushes; the
    caller commits with the action itself). Detail values that are not JSON become strings."""
    if actor == CLI and "os_user" not in detail:
        detail["os_user"] = _os_user()
    entry = AuditEntry(at=utcnow(), actor=_actor_key(actor), action=action, target=target,
                       detail=json.loads(json.dumps(detail, default=str)))
    session.add(entry)
    session.flush()
    return entry


def latest(session: Session, *, since: datetime | None = None, limit: int | None = 50) -> list[AuditEntry]:
    """The newest `limit` entries (at or after `since` when given), newest first."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc())
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    return list(session.scalars(query.limit(limit)))


def actor_names(session: Session, entries: list[AuditEntry]) -> dict[str, str]:
    """actor key -> what to show: "username (#id)", "cli", or "deleted user #id"."""
    ids = {int(e.actor) for e in entries if e.actor.isdigit()}
    names = dict(session.execute(select(User.id, User.username).where(User.id.in_(ids))).all()) if ids else {}

    def shown(key: str) -> str:
        if not key.isdigit():
            return key
        name = names.get(int(key))
        return f"{name} (#{key})" if name is not None else f"deleted user #{key}"

    return {e.actor: shown(e.actor) for e in entries}


def when(entry: AuditEntry) -> datetime:
    """The entry's time in UTC (SQLite gives it back without a time zone)."""
    return entry.at if entry.at.tzinfo else entry.at.replace(tzinfo=UTC)


def as_json(entry: AuditEntry, actor_name: str | None = None) -> dict[str, Any]:
    """One entry as a JSON object (`rlhf label audit --json`, one per line)."""
    return {"id": entry.id, "at": when(entry).isoformat(), "actor": entry.actor,
            "actor_name": actor_name or entry.actor, "action": entry.action, "target": entry.target,
            "detail": entry.detail}
