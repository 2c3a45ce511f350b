"""Accounts and login sessions.

Usernames are stored NFKC-normalized and are unique case-insensitively: `username_key` (the
NFKC casefold) has a unique index, so "Admin", "ＡＤＭＩＮ" and "admin" are one account name.
Control and invisible (format) characters are refused, and so are names that mix scripts
("аdmin" with a Cyrillic а). Logging in with any spelling that has the same key works.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import ROLES, LoginSession, User, username_key, utcnow
from rlhfkit.feedback.passwords import check_password
from rlhfkit.feedback.security import (
    dummy_password_hash,
    hash_password,
    needs_rehash,
    new_token,
    token_digest,
    verify_password,
)

MAX_USERNAME = 64
SESSION_LIFETIME = timedelta(days=7)
# A session unused this long has ended, whatever its lifetime (`rlhf label serve --idle-timeout-hours`).
IDLE_TIMEOUT = timedelta(hours=12)
TOUCH_INTERVAL = timedelta(minutes=5)
# Control, format (zero-width, bidi overrides), surrogate, private-use and unassigned
# characters, and line/paragraph separators: nothing a person types as a name.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# Japanese mixes these scripts in one word; any other mix of scripts is refused.
_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "CJK": "CJK"}


def normalize_username(username: str) -> str:
    return unicodedata.normalize("NFKC", username).strip()


def _script(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    first = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
    return _SCRIPT_GROUPS.get(first, first)


def validate_username(username: str) -> str:
    """The normalized username, or a DataError (field 'username') saying what is wrong."""
    name = normalize_username(username)
    if not name or len(name) > MAX_USERNAME:
        raise DataError(f"a username needs 1 to {MAX_USERNAME} characters", field="username")
    if any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in name):
        raise DataError("a username cannot contain control or invisible characters", field="username")
    if len({s for s in map(_script, name) if s is not None}) > 1:
        raise DataError("a username cannot mix alphabets (e.g. Latin and Cyrillic letters)", field="username")
    return name


def create_user(session: Session, username: str, password: str, role: str) -> User:
    """A new active account. The password must pass the policy (`passwords.py`). Flushes;
    the caller commits."""
    if role not in ROLES:
        raise DataError(f"unknown role {role!r} (use {', '.join(ROLES)})", field="role")
    name = validate_username(username)
    check_password(password, name)
    key = username_key(name)
    if session.scalar(select(User.id).where(User.username_key == key)) is not None:
        raise DataError(f"the username {name!r} is taken", field="username")
    user = User(username=name, username_key=key, password_hash=hash_password(password), role=role)
    try:
        with session.begin_nested():
            session.add(user)
    except IntegrityError:  # the same name, created a moment ago by another request
        raise DataError(f"the username {name!r} is taken", field="username") from None
    return user


def find_user(session: Session, username: str) -> User | None:
    """The account `username` names: by its exact name first (two accounts created before
    usernames were case-insensitive may differ only in case), else any spelling with the
    same key."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        user = session.scalar(select(User).where(User.username_key == username_key(username)))
    return user


def authenticate(database: Database, username: str, password: str) -> User | None:
    """The active user with these credentials, or None.

    The scrypt check runs with no transaction open: the user is read in a read session that
    is closed first, so a flood of wrong passwords never holds the SQLite write lock. A hash
    made with older parameters is replaced after a successful check, in a short write.
    """
    with database.read() as session:
        user = find_user(session, username)
    stored = user.password_hash if user is not None else dummy_password_hash()
    if not verify_password(password, stored) or user is None or not user.active:
        return None
    if needs_rehash(stored):
        fresh = hash_password(password)
        with database.write() as session:
            session.execute(update(User).where(User.id == user.id, User.password_hash == stored)
                            .values(password_hash=fresh))
            session.commit()
    return user


def start_session(session: Session, user: User, now: datetime | None = None) -> str:
    """A new session token for `user` (goes into the cookie; only its digest is stored)."""
    now = now or utcnow()
    token = new_token()
    session.add(LoginSession(token_hash=token_digest(token), user_id=user.id, created_at=now, last_seen_at=now,
                             expires_at=now + SESSION_LIFETIME))
    session.flush()
    return token


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite gives naive UTC back


def last_seen(login: LoginSession) -> datetime:
    return _aware(login.last_seen_at or login.created_at)


def live_login(session: Session, token: str, *, idle_timeout: timedelta = IDLE_TIMEOUT,
               now: datetime | None = None) -> LoginSession | None:
    """The session `token` names, with its user loaded, while it runs: not past its absolute
    lifetime, not idle longer than `idle_timeout`, and its user active. Reads only."""
    now = now or utcnow()
    login = session.get(LoginSession, token_digest(token))
    if login is None or _aware(login.expires_at) <= now or last_seen(login) + idle_timeout <= now:
        return None
    return login if login.user.active else None


def user_for_token(session: Session, token: str, *, idle_timeout: timedelta = IDLE_TIMEOUT,
                   now: datetime | None = None) -> User | None:
    login = live_login(session, token, idle_timeout=idle_timeout, now=now)
    return None if login is None else login.user


def touch_interval(idle_timeout: timedelta) -> timedelta:
    """How stale `last_seen_at` may get before a request refreshes it: a write at most every
    few minutes per session, not one per request (the SQLite write lock is the votes')."""
    return min(TOUCH_INTERVAL, idle_timeout / 10)


def touch_session(database: Database, token: str, *, idle_timeout: timedelta = IDLE_TIMEOUT,
                  now: datetime | None = None) -> None:
    """Note a request on session `token`: one short UPDATE, only when `last_seen_at` is older
    than `touch_interval` (the caller checks first, so most requests never get here)."""
    now = now or utcnow()
    with database.write() as session:
        session.execute(update(LoginSession).where(
            LoginSession.token_hash == token_digest(token),
            or_(LoginSession.last_seen_at.is_(None), LoginSession.last_seen_at < now - touch_interval(idle_timeout)))
            .values(last_seen_at=now))
        session.commit()


def purge_expired_sessions(session: Session, *, idle_timeout: timedelta = IDLE_TIMEOUT,
                           now: datetime | None = None) -> int:
    """Delete the session rows that can no longer log anyone in (past their lifetime or idle
    too long): two indexed range deletes, run at each login. The number deleted."""
    now = now or utcnow()
    result = session.execute(delete(LoginSession).where(or_(
        LoginSession.expires_at <= now, LoginSession.last_seen_at <= now - idle_timeout,
        and_(LoginSession.last_seen_at.is_(None), LoginSession.created_at <= now - idle_timeout)))
        .execution_options(synchronize_session=False))
    return result.rowcount


def end_session(session: Session, token: str) -> None:
    session.execute(delete(LoginSession).where(LoginSession.token_hash == token_digest(token)))


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.role, User.username)))
