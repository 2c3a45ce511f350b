"""The account lifecycle: deactivate, activate, reset a password, end every session.

Each function changes one account in the caller's write session (flushes; the caller
commits). Every change that takes access away also ends the account's sessions at once, so
a browser logged in as that user is refused at its next request. Votes are never touched:
a deactivated annotator's votes stay in the dashboard and in every export.
"""

from __future__ import annotations

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.models import Assignment, LoginSession, User, utcnow
from rlhfkit.feedback.passwords import check_password
from rlhfkit.feedback.security import hash_password
from rlhfkit.feedback.users import find_user


def require_user(session: Session, username: str) -> User:
    """The account `username` names, or a DataError (field 'username')."""
    user = find_user(session, username)
    if user is None:
        raise DataError(f"no account named {username!r}", field="username")
    return user


def refuse_self(actor: User, user: User, what: str) -> None:
    """A DataError when `actor` would act on their own account (`what`: "deactivate your own account")."""
    if actor.id == user.id:
        raise DataError(f"you cannot {what}", field="username")


def revoke_sessions(session: Session, user: User) -> int:
    """End every login session of `user`; the number ended."""
    result = session.execute(delete(LoginSession).where(LoginSession.user_id == user.id)
                             .execution_options(synchronize_session=False))
    session.flush()
    return result.rowcount


def deactivate(session: Session, user: User) -> int:
    """`user` can no longer log in; their sessions end and their running claims are released
    (others get those items now). Returns the number of sessions ended."""
    user.active = False
    now = utcnow()
    session.execute(update(Assignment).where(Assignment.user_id == user.id, Assignment.lease_expires_at > now)
                    .values(lease_expires_at=now).execution_options(synchronize_session=False))
    return revoke_sessions(session, user)


def activate(session: Session, user: User) -> None:
    user.active = True
    session.flush()


def reset_password(session: Session, user: User, password: str) -> int:
    """Set a new password (the policy of passwords.py applies) and end every session of
    `user`, so whoever knew the old one is logged out. Returns the number of sessions ended."""
    check_password(password, user.username)
    user.password_hash = hash_password(password)
    return revoke_sessions(session, user)
