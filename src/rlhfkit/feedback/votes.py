"""Turning what an annotator pressed into a stored vote, and undoing or editing it.

An annotator sees candidates labelled A, B, C, ... in their own shuffled order. Their
answer is first written as ranks over the *shown* positions (`shown_ranks`), then mapped
back to the imported order through the assignment's display order:

    ranks[display_order[j]] = shown_ranks[j]

Pairwise answers are ranks too: A better = (0, 1), B better = (1, 0), tie and both bad =
(0, 0) (both bad also sets `both_bad`). A ranking is typed as "D > C > A = B": '>'
separates levels best first, '=' joins a tie; it becomes shown ranks (2, 2, 1, 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from rlhfkit.feedback.assignment import CLAIM_LEASE
from rlhfkit.feedback.models import PAIRWISE, Assignment, Item, Project, User, Vote, VoteHistory, utcnow

LETTERS = "ABCDEFGHI"
MAX_RATIONALE = 5000
STRENGTHS = (1, 2, 3)
PAIRWISE_CHOICES: dict[str, tuple[tuple[int, int], bool]] = {
    "A": ((0, 1), False),
    "B": ((1, 0), False),
    "tie": ((0, 0), False),
    "both_bad": ((0, 0), True),
}


class VoteError(ValueError):
    """A vote that cannot be stored; the message is shown to the annotator."""


@dataclass(frozen=True)
class VoteInput:
    """An answer in the annotator's own display order."""

    shown_ranks: tuple[int, ...]
    both_bad: bool = False
    strength: int | None = None
    rationale: str | None = None


def parse_ranking(text: str, count: int) -> tuple[int, ...]:
    """Shown ranks from "D > C > A = B" (letters, or numbers 1-9 for the keys pressed).

    Every candidate must appear exactly once. "D>C>A=B" over 4 candidates -> (2, 2, 1, 0).
    """
    compact = re.sub(r"\s+", "", text or "").upper()
    if not compact:
        raise VoteError("rank all candidates, best first (e.g. D > C > A = B)")
    ranks: dict[int, int] = {}
    for level, group in enumerate(compact.split(">")):
        if not group:
            raise VoteError("empty place in the ranking (two '>' in a row?)")
        for token in group.split("="):
            position = _position(token, count)
            if position in ranks:
                raise VoteError(f"{LETTERS[position]} appears twice in the ranking")
            ranks[position] = level
    missing = [LETTERS[j] for j in range(count) if j not in ranks]
    if missing:
        raise VoteError(f"not ranked yet: {', '.join(missing)}")
    return tuple(ranks[j] for j in range(count))


def _position(token: str, count: int) -> int:
    if len(token) == 1 and token in LETTERS[:count]:
        return LETTERS.index(token)
    if len(token) == 1 and token.isdigit() and 1 <= int(token) <= count:
        return int(token) - 1
    raise VoteError(f"unknown candidate {token!r} (use {LETTERS[0]}-{LETTERS[count - 1]})")


def format_ranking(shown_ranks: tuple[int, ...] | list[int]) -> str:
    """(2, 2, 1, 0) -> "D > C > A = B" (the inverse of `parse_ranking`)."""
    levels: dict[int, list[str]] = {}
    for position, rank in enumerate(shown_ranks):
        levels.setdefault(rank, []).append(LETTERS[position])
    return " > ".join(" = ".join(levels[rank]) for rank in sorted(levels))


def pairwise_choice(shown_ranks: tuple[int, ...] | list[int], both_bad: bool) -> str:
    """The key of PAIRWISE_CHOICES that gives these shown ranks."""
    if both_bad:
        return "both_bad"
    return {(0, 1): "A", (1, 0): "B"}.get(tuple(shown_ranks), "tie")


def build_vote_input(kind: str, count: int, *, choice: str | None = None, ranking: str | None = None,
                     strength: str | int | None = None, rationale: str | None = None,
                     all_bad: bool = False) -> VoteInput:
    """Validate a submitted answer (form fields or JSON) for an item of `kind`."""
    strength_value = _parse_strength(strength)
    if kind == PAIRWISE:
        if choice not in PAIRWISE_CHOICES:
            raise VoteError("choose A, B, tie or both bad (keys 1-4 or a/b/t/x)")
        shown_ranks, both_bad = PAIRWISE_CHOICES[choice]
        if strength_value is not None and shown_ranks == (0, 0):
            raise VoteError("a strength goes with a preference, not with a tie or both bad")
    else:
        if strength_value is not None:
            raise VoteError("strength is for pairwise items only")
        shown_ranks, both_bad = parse_ranking(ranking or "", count), bool(all_bad)
    text = (rationale or "").strip()
    if len(text) > MAX_RATIONALE:
        raise VoteError(f"the rationale is longer than {MAX_RATIONALE} characters")
    return VoteInput(shown_ranks=tuple(shown_ranks), both_bad=both_bad, strength=strength_value,
                     rationale=text or None)


def _parse_strength(strength: str | int | None) -> int | None:
    if strength is None or strength == "":
        return None
    try:
        value = int(strength)
    except (TypeError, ValueError):
        raise VoteError("strength must be 1, 2 or 3") from None
    if value not in STRENGTHS:
        raise VoteError("strength must be 1, 2 or 3")
    return value


def to_item_order(shown_ranks: tuple[int, ...], order: list[int]) -> list[int]:
    ranks = [0] * len(order)
    for position, index in enumerate(order):
        ranks[index] = shown_ranks[position]
    return ranks


def to_shown_order(ranks: list[int], order: list[int]) -> tuple[int, ...]:
    return tuple(ranks[index] for index in order)


def keep_version(session: Session, vote: Vote, reason: str) -> VoteHistory:
    """Copy `vote` as it stands into `vote_history` before an edit ("edit") or an undo
    ("undo") changes it, so the labels of a round at any earlier moment can be rebuilt."""
    version = VoteHistory(vote_id=vote.id, item_id=vote.item_id, user_id=vote.user_id, project_id=vote.project_id,
                          ranks=list(vote.ranks), both_bad=vote.both_bad, strength=vote.strength,
                          rationale=vote.rationale, display_order=list(vote.display_order),
                          valid_from=vote.updated_at, replaced_at=utcnow(), reason=reason)
    session.add(version)
    return version


def save_vote(session: Session, assignment: Assignment, answer: VoteInput) -> Vote:
    """Store (or overwrite) the assignment holder's vote; an overwritten version is kept in
    `vote_history`. Flushes; the caller commits."""
    item = assignment.item
    if len(answer.shown_ranks) != len(item.responses):
        raise VoteError(f"expected {len(item.responses)} ranks")
    last = session.scalar(select(func.max(Vote.sequence)).where(Vote.user_id == assignment.user_id))
    vote = session.scalar(select(Vote).where(Vote.item_id == item.id, Vote.user_id == assignment.user_id))
    if vote is None:
        vote = Vote(item_id=item.id, user_id=assignment.user_id, project_id=item.project_id)
        session.add(vote)
    else:
        keep_version(session, vote, "edit")
    vote.ranks = to_item_order(answer.shown_ranks, assignment.display_order)
    vote.both_bad = answer.both_bad
    vote.strength = answer.strength
    vote.rationale = answer.rationale
    vote.display_order = list(assignment.display_order)
    vote.updated_at = utcnow()
    assignment.lease_expires_at = None  # answered: the item is theirs for good
    vote.sequence = (last or 0) + 1
    session.flush()
    return vote


def own_votes(session: Session, user: User, project: Project | None = None,
              limit: int | None = None) -> list[Vote]:
    """`user`'s votes, most recently saved first."""
    query = select(Vote).where(Vote.user_id == user.id).order_by(Vote.sequence.desc())
    if project is not None:
        query = query.where(Vote.project_id == project.id)
    return list(session.scalars(query.limit(limit)))


def own_vote(session: Session, user: User, vote_id: int) -> Vote | None:
    """The vote `vote_id` if it is `user`'s, else None: there is no way to reach another
    annotator's vote through this module."""
    return session.scalar(select(Vote).where(Vote.id == vote_id, Vote.user_id == user.id))


def own_vote_for_item(session: Session, user: User, item_id: int) -> Vote | None:
    return session.scalar(select(Vote).where(Vote.item_id == item_id, Vote.user_id == user.id))


def undo_last_vote(session: Session, project: Project, user: User, *, lease: timedelta = CLAIM_LEASE) -> Item | None:
    """Delete `user`'s most recently saved vote in `project` (kept in `vote_history`); returns
    its item (to show it again, claimed anew for `lease`), or None when they have no vote.
    Flushes; the caller commits."""
    last = own_votes(session, user, project, limit=1)
    if not last:
        return None
    item = last[0].item
    keep_version(session, last[0], "undo")
    session.execute(delete(Vote).where(Vote.id == last[0].id))
    session.execute(update(Assignment).where(Assignment.item_id == item.id, Assignment.user_id == user.id)
                    .values(lease_expires_at=utcnow() + lease).execution_options(synchronize_session=False))
    session.flush()
    return item
