"""The tables of the labeling app.

A project holds rounds; a round holds the items imported or generated from one model
version; an item is a prompt with K candidate responses (K = 2: pairwise, K > 2: ranking).
An annotator is given an item through an `Assignment`, which fixes the order in which the
candidates are shown to them, and answers it with one `Vote`.

Every answer is stored the same way, pairwise or ranking: `Vote.ranks[i]` is the rank the
annotator gave to `Item.responses[i]` in the *imported* order (0 = best, equal = tie), so
the display order never leaks into the data; the display order is kept beside it.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ADMIN = "admin"
ANNOTATOR = "annotator"
ROLES = (ADMIN, ANNOTATOR)

PAIRWISE = "pairwise"
RANKING = "ranking"


def utcnow() -> datetime:
    return datetime.now(UTC)


def username_key(username: str) -> str:
    """What makes two usernames the same account name: NFKC, stripped, casefolded."""
    return unicodedata.normalize("NFKC", username).strip().casefold()


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # NFKC + casefold of the username (users.username_key): unique, so names that differ only
    # in case or Unicode width are one account name.
    username_key: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


class LoginSession(Base):
    """A logged-in browser. The cookie holds a random token; only its SHA-256 is stored, so
    a copy of the database does not let anyone log in."""

    __tablename__ = "login_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # The last request seen on it (refreshed at most every few minutes, see users.py): a
    # session idle longer than the server's idle timeout has ended. None = created_at.
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                          default=utcnow, index=True)

    user: Mapped[User] = relationship()


class Setting(Base):
    """Small key/value facts the app keeps across restarts (e.g. the cookie signing key)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    overlap: Mapped[int] = mapped_column(Integer, default=2)
    guidelines_md: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # True: every annotator may label it; False: only its members (`ProjectMember`). Admins
    # see every project. Projects from before schema 3 were made open (what they were).
    open_to_all: Mapped[bool] = mapped_column(Boolean, default=False)

    # Every round, the ones being imported included (see `published()`).
    rounds: Mapped[list[Round]] = relationship(back_populates="project", order_by="Round.number")


class ProjectMember(Base):
    """Annotator `user_id` may see and label project `project_id` (when it is not open to all).
    The primary key (project_id, user_id) makes the check on every claim and vote one index
    lookup."""

    __tablename__ = "project_members"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)


class Round(Base):
    """A round of a project. Rounds annotators see are numbered 1, 2, …; a round still being
    imported has a negative number and is invisible to every query that filters with
    `published()` (imports.py: a large import is written in chunks, then published at once)."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("project_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    project: Mapped[Project] = relationship(back_populates="rounds")
    items: Mapped[list[Item]] = relationship(back_populates="round", order_by="Item.position")


def published():
    """SQL: the round is published (not one being imported). Every query that shows items,
    rounds or votes to annotators, reports or exports joins `Round` and filters with this."""
    return Round.number > 0


class Item(Base):
    """An imported id names one item of its project (unique index; NULL ids are not compared)."""

    __tablename__ = "items"
    __table_args__ = (Index("ux_items_project_external_id", "project_id", "external_id", unique=True),
                      # a round's items in order: the next item to claim is found walking it
                      Index("ix_items_round_position", "round_id", "position"))

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    # Kept beside round_id so "next item of this project" is one indexed query.
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    external_id: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # The prompt as imported: a string or a list of {role, content} messages.
    prompt: Mapped[Any] = mapped_column(JSON)
    responses: Mapped[list[str]] = mapped_column(JSON)
    # Gold ranks over `responses` (None = not specified), or None for a normal item.
    gold_ranks: Mapped[list[int | None] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(500), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    round: Mapped[Round] = relationship(back_populates="items")

    @property
    def kind(self) -> str:
        return PAIRWISE if len(self.responses) == 2 else RANKING


class Assignment(Base):
    """Item `item_id` is given to `user_id`, shown in `display_order`: position j on screen
    shows `item.responses[display_order[j]]`.

    An unanswered assignment is a claim that lasts until `lease_expires_at`; once expired it
    no longer counts against the item's overlap (see assignment.py). An answered one has no
    lease (None): it holds the item for good."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    display_order: Mapped[list[int]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    item: Mapped[Item] = relationship()
    user: Mapped[User] = relationship()


class VoteAnswer:
    """What an annotator answered: the columns a vote and each earlier version of it share."""

    ranks: Mapped[list[int]] = mapped_column(JSON)
    both_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    strength: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    display_order: Mapped[list[int]] = mapped_column(JSON)


class Vote(VoteAnswer, Base):
    """One annotator's answer to one item (edits overwrite it; undo deletes it; the version
    replaced or deleted goes to `vote_history`)."""

    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Bumped on every save: orders "my last votes" without trusting clock resolution.
    sequence: Mapped[int] = mapped_column(Integer, default=0, index=True)

    item: Mapped[Item] = relationship()
    user: Mapped[User] = relationship()


class AuditEntry(Base):
    """One admin action or export (who, what, when), written in the transaction of the action
    itself: a change without its audit row is never committed. See audit.py."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # A user id (as text) or "cli" for a command run on the server's machine. No foreign key:
    # the log outlives the accounts it names.
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(500), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class VoteHistory(VoteAnswer, Base):
    """A version of a vote that an edit replaced or an undo deleted: with `votes`, the labels
    of a round as they stood at any moment (a version holds from `valid_from` until
    `replaced_at`). `vote_id` has no foreign key: an undone vote's row is gone."""

    __tablename__ = "vote_history"

    id: Mapped[int] = mapped_column(primary_key=True)
    vote_id: Mapped[int] = mapped_column(Integer, index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    replaced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # "edit" (a newer answer replaced it) or "undo" (the annotator took it back).
    reason: Mapped[str] = mapped_column(String(16))

    item: Mapped[Item] = relationship()
    user: Mapped[User] = relationship()
