"""Who labels what: items handed out with overlap k, candidates shuffled per annotator.

Rules:
- An annotator holds at most one unanswered item per project; asking for work returns it
  until it is answered (so reloading a page never skips an item).
- Otherwise they get the first item (oldest round first, file order within a round) that
  they have not had and that fewer than `project.overlap` annotators have had.
- Gold items go to every annotator, whatever the overlap: every annotator gets a gold
  accuracy, and gold items give the agreement statistics the most raters per unit.
- The order in which the candidates are shown is a shuffle seeded by (item, annotator):
  fixed across reloads, different between annotators, and stored with the assignment
  and with the vote, so position bias can be measured and cannot leak into the labels.
"""

from __future__ import annotations

import random

from sqlalchemy import exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.feedback.models import Assignment, Item, Project, Round, User, Vote


def display_order(item_id: int, user_id: int, count: int) -> list[int]:
    """A permutation of range(count): position j on screen shows response order[j]."""
    order = list(range(count))
    random.Random(f"display-order:{item_id}:{user_id}").shuffle(order)
    return order


def _unanswered(project: Project, user: User):
    answered = exists().where(Vote.item_id == Assignment.item_id, Vote.user_id == Assignment.user_id)
    return (select(Assignment)
            .where(Assignment.project_id == project.id, Assignment.user_id == user.id, ~answered)
            .order_by(Assignment.id))


def next_assignment(session: Session, project: Project, user: User) -> Assignment | None:
    """The item `user` should answer next in `project`, claiming a new one when needed;
    None when nothing is left for them. Flushes; the caller commits."""
    held = session.scalars(_unanswered(project, user).limit(1)).first()
    if held is not None:
        return held
    # Serialize claims on the project (PostgreSQL row lock; SQLite's BEGIN IMMEDIATE
    # already serializes writers) so an item never goes to more than `overlap` annotators.
    session.execute(select(Project.id).where(Project.id == project.id).with_for_update())
    holders = select(func.count(Assignment.id)).where(Assignment.item_id == Item.id).scalar_subquery()
    already_mine = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id)
    item = session.scalars(
        select(Item).join(Round, Item.round_id == Round.id)
        .where(Item.project_id == project.id, ~already_mine,
               or_(Item.gold_ranks.is_not(None), holders < project.overlap))
        .order_by(Round.number, Item.position).limit(1)
    ).first()
    if item is None:
        return None
    assignment = Assignment(item_id=item.id, user_id=user.id, project_id=project.id,
                            display_order=display_order(item.id, user.id, len(item.responses)))
    try:
        with session.begin_nested():
            session.add(assignment)
    except IntegrityError:  # the same annotator claimed it from another tab a moment ago
        return session.scalars(_unanswered(project, user).limit(1)).first()
    return assignment


def assignment_for(session: Session, item_id: int, user: User) -> Assignment | None:
    """`user`'s assignment for an item, or None (they were never given it)."""
    return session.scalar(select(Assignment).where(Assignment.item_id == item_id,
                                                   Assignment.user_id == user.id))
