"""Accounts and login sessions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.models import ROLES, LoginSession, User, utcnow
from rlhfkit.feedback.security import (
    DUMMY_PASSWORD_HASH,
    hash_password,
    new_token,
    token_digest,
    verify_password,
)

MAX_USERNAME = 64
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
SESSION_LIFETIME = timedelta(days=7)


def validate_credentials(username: str, password: str) -> None:
    if not username.strip() or len(username) > MAX_USERNAME:
        raise DataError(f"a username needs 1 to {MAX_USERNAME} characters", field="username")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in username):
        raise DataError("a username cannot contain control characters", field="username")
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise DataError(f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters", field="password")


def create_user(session: Session, username: str, password: str, role: str) -> User:
    """A new active account. Flushes; the caller commits."""
    if role not in ROLES:
        raise DataError(f"unknown role {role!r} (use {', '.join(ROLES)})", field="role")
    validate_credentials(username, password)
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise DataError(f"the username {username!r} is taken", field="username")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with these credentials, or None."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        verify_password(password, DUMMY_PASSWORD_HASH)
        return None
    if not verify_password(password, user.password_hash) or not user.active:
        return None
    return user


def start_session(session: Session, user: User) -> str:
    """A new session token for `user` (goes into the cookie; only its digest is stored)."""
    token = new_token()
    session.add(LoginSession(token_hash=token_digest(token), user_id=user.id,
                             expires_at=utcnow() + SESSION_LIFETIME))
    session.flush()
    return token


def user_for_token(session: Session, token: str) -> User | None:
    login = session.get(LoginSession, token_digest(token))
    if login is None:
        return None
    expires = login.expires_at if login.expires_at.tzinfo else login.expires_at.replace(tzinfo=UTC)
    if expires < datetime.now(UTC) or not login.user.active:
        return None
    return login.user


def end_session(session: Session, token: str) -> None:
    session.execute(delete(LoginSession).where(LoginSession.token_hash == token_digest(token)))


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.role, User.username)))
