"""Who labels what: items handed out with overlap k, candidates shuffled per annotator.

Rules:
- An annotator holds at most one unanswered item per project; asking for work returns it
  until it is answered (so reloading a page never skips an item).
- Otherwise they get the first item (oldest round first, file order within a round) that
  they do not hold and that fewer than `project.overlap` annotators hold.
- A claim (an unanswered assignment) is a lease: it holds the item for `CLAIM_LEASE` (30 min
  unless `rlhf label serve --claim-lease-minutes` says otherwise), renewed when its vote is
  undone. An expired claim does not count against the overlap, so the item is offered to the
  next annotator; an admin can expire claims at once (`release_claims`). Whoever held an
  expired claim can still answer it while the item has room (`confirm_claim`); once others
  fill it, their claim is dropped. An answered assignment has no lease: it holds for good.
- Claiming writes, so it happens only on a POST: a GET (a link, a prefetch, another site's
  <img>) never takes an item from the queue.
- Gold items go to every annotator, whatever the overlap: every annotator gets a gold
  accuracy, and gold items give the agreement statistics the most raters per unit.
- The order in which the candidates are shown is a shuffle seeded by (item, annotator):
  fixed across reloads, different between annotators, and stored with the assignment
  and with the vote, so position bias can be measured and cannot leak into the labels.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.feedback.models import Assignment, Item, Project, Round, User, Vote, published, utcnow

CLAIM_LEASE = timedelta(minutes=30)


def display_order(item_id: int, user_id: int, count: int) -> list[int]:
    """A permutation of range(count): position j on screen shows response order[j]."""
    order = list(range(count))
    random.Random(f"display-order:{item_id}:{user_id}").shuffle(order)
    return order


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite gives naive UTC back


def is_live(assignment: Assignment, now: datetime) -> bool:
    """True when the assignment holds its item: answered, or a claim whose lease runs."""
    return assignment.lease_expires_at is None or _aware(assignment.lease_expires_at) > now


def _holds(now: datetime):
    """SQL: the assignment counts against its item's overlap."""
    return or_(Assignment.lease_expires_at.is_(None), Assignment.lease_expires_at > now)


def _unanswered(project: Project, user: User):
    answered = exists().where(Vote.item_id == Assignment.item_id, Vote.user_id == Assignment.user_id)
    return (select(Assignment)
            .where(Assignment.project_id == project.id, Assignment.user_id == user.id, ~answered)
            .order_by(Assignment.id))


def held_assignment(session: Session, project: Project, user: User, now: datetime | None = None) -> Assignment | None:
    """`user`'s live claim in `project` (what they are working on), or None. Reads only."""
    now = now or utcnow()
    return next((a for a in session.scalars(_unanswered(project, user)) if is_live(a, now)), None)


def _first_claimable(session: Session, project: Project, user: User, now: datetime) -> Item | None:
    """The first item of `project` (oldest published round first, then position) that `user`
    does not hold and that is gold or held by fewer than `project.overlap` annotators.

    One query per round, each walking the index on items (round_id, position) and stopping at
    the first item with room: the items before it cost two index probes each. One query over
    the whole project, ordered by (round number, position) through the join, tested every
    item of the project and sorted them (≈ 11 ms per claim at 20k items, under the write lock)."""
    holders = select(func.count(Assignment.id)).where(Assignment.item_id == Item.id, _holds(now)).scalar_subquery()
    mine = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id, _holds(now))
    rounds = session.scalars(select(Round.id).where(Round.project_id == project.id, published())
                             .order_by(Round.number)).all()
    for round_id in rounds:
        item = session.scalars(select(Item).where(Item.round_id == round_id, ~mine,
                                                  or_(Item.gold_ranks.is_not(None), holders < project.overlap))
                               .order_by(Item.position).limit(1)).first()
        if item is not None:
            return item
    return None


def has_work(session: Session, project: Project, user: User, now: datetime | None = None) -> bool:
    """True when `user` holds an item in `project` or could claim one. Reads only."""
    now = now or utcnow()
    return (held_assignment(session, project, user, now) is not None
            or _first_claimable(session, project, user, now) is not None)


def _lock_project(session: Session, project: Project) -> None:
    # Serialize claims on the project (PostgreSQL row lock; SQLite's BEGIN IMMEDIATE
    # already serializes writers) so an item never goes to more than `overlap` annotators.
    session.execute(select(Project.id).where(Project.id == project.id).with_for_update())


def next_assignment(session: Session, project: Project, user: User, *, lease: timedelta = CLAIM_LEASE,
                    now: datetime | None = None) -> Assignment | None:
    """The item `user` should answer next in `project`, claiming a new one for `lease` when
    needed; None when nothing is left for them. Writes: call it for a POST, in a write
    transaction. Flushes; the caller commits."""
    now = now or utcnow()
    mine = list(session.scalars(_unanswered(project, user)))
    held = next((a for a in mine if is_live(a, now)), None)
    if held is not None:
        return held
    _lock_project(session, project)
    for expired in mine:  # their own expired claims are given up; such an item comes back below if it has room
        session.delete(expired)
    session.flush()
    item = _first_claimable(session, project, user, now)
    if item is None:
        return None
    assignment = Assignment(item_id=item.id, user_id=user.id, project_id=project.id,
                            display_order=display_order(item.id, user.id, len(item.responses)),
                            lease_expires_at=now + lease)
    try:
        with session.begin_nested():
            session.add(assignment)
    except IntegrityError:  # the same annotator claimed it from another tab a moment ago
        return held_assignment(session, project, user, now)
    return assignment


def confirm_claim(session: Session, project: Project, assignment: Assignment, *, lease: timedelta = CLAIM_LEASE,
                  now: datetime | None = None) -> bool:
    """Before a vote: True when `assignment` still holds its item, renewing an expired claim
    while the item has room; False when others have filled it meanwhile (the claim is then
    dropped). Flushes; the caller commits."""
    now = now or utcnow()
    if is_live(assignment, now):
        return True
    _lock_project(session, project)
    others = session.scalar(select(func.count(Assignment.id)).where(
        Assignment.item_id == assignment.item_id, Assignment.user_id != assignment.user_id, _holds(now)))
    if assignment.item.gold_ranks is not None or others < project.overlap:
        assignment.lease_expires_at = now + lease
        session.flush()
        return True
    session.delete(assignment)
    session.flush()
    return False


def release_claims(session: Session, project: Project, user: User | None = None,
                   now: datetime | None = None) -> int:
    """Expire every running claim in `project` (only `user`'s when given): their items are
    offered again at once. Answered items stay with their voters. The number released."""
    now = now or utcnow()
    query = update(Assignment).where(Assignment.project_id == project.id, Assignment.lease_expires_at > now)
    if user is not None:
        query = query.where(Assignment.user_id == user.id)
    result = session.execute(query.values(lease_expires_at=now).execution_options(synchronize_session=False))
    session.flush()
    return result.rowcount


def claim_counts(session: Session, project: Project, now: datetime | None = None) -> tuple[int, int]:
    """(running claims, expired claims) in `project`."""
    now = now or utcnow()
    unanswered = Assignment.lease_expires_at.is_not(None)
    running = session.scalar(select(func.count(Assignment.id)).where(
        Assignment.project_id == project.id, unanswered, Assignment.lease_expires_at > now))
    expired = session.scalar(select(func.count(Assignment.id)).where(
        Assignment.project_id == project.id, unanswered, Assignment.lease_expires_at <= now))
    return running, expired


def assignment_for(session: Session, item_id: int, user: User) -> Assignment | None:
    """`user`'s assignment for an item, or None (they were never given it)."""
    return session.scalar(select(Assignment).where(Assignment.item_id == item_id,
                                                   Assignment.user_id == user.id))
