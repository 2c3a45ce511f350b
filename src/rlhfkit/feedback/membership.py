"""Who may label a project: its members, or every annotator when it is open to all.

- An admin sees and may label every project.
- An annotator sees a project (in the list, its pages, the JSON API) only when it is open to
  all annotators or they are a member; to anyone else it answers 404, as if it did not exist.
- A new project is members-only unless made open (`create_project(open_to_all=True)`,
  `rlhf label import --open`); projects from before schema 3 were made open, as they were.
- The check on every claim and vote is one primary-key lookup in `project_members`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, delete, exists, or_, select, update
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.models import ANNOTATOR, Assignment, Project, ProjectMember, User, utcnow
from rlhfkit.feedback.users import find_user


def can_access(session: Session, project: Project, user: User) -> bool:
    if user.is_admin or project.open_to_all:
        return True
    return session.get(ProjectMember, (project.id, user.id)) is not None


def visible_projects(user: User) -> Select:
    """SELECT of the projects `user` may see, by name."""
    query = select(Project).order_by(Project.name)
    if user.is_admin:
        return query
    member = exists().where(ProjectMember.project_id == Project.id, ProjectMember.user_id == user.id)
    return query.where(or_(Project.open_to_all, member))


def member_names(session: Session, project: Project) -> list[str]:
    return list(session.scalars(select(User.username).join(ProjectMember, ProjectMember.user_id == User.id)
                                .where(ProjectMember.project_id == project.id).order_by(User.username)))


def parse_names(text: str | None) -> list[str]:
    """'alice, bob' -> ['alice', 'bob']."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


# The web form's choice of access -> open_to_all ("" leaves it as it is).
ACCESS_CHOICES = {"open": True, "members": False}


def parse_access(value: str | None) -> bool | None:
    """'open' -> True, 'members' -> False, '' -> None (unchanged); anything else a DataError."""
    value = (value or "").strip()
    if not value:
        return None
    if value not in ACCESS_CHOICES:
        raise DataError(f"access must be one of {', '.join(ACCESS_CHOICES)}", field="access")
    return ACCESS_CHOICES[value]


def _annotators(session: Session, names: Iterable[str]) -> list[User]:
    users = []
    for name in names:
        user = find_user(session, name)
        if user is None:
            raise DataError(f"no account named {name!r}", field="members")
        if user.role != ANNOTATOR:
            raise DataError(f"{name!r} is an {user.role}: admins see every project already", field="members")
        users.append(user)
    return users


def add_members(session: Session, project: Project, names: Iterable[str]) -> list[User]:
    """Make the named annotators members (already members stay); flushes."""
    users = _annotators(session, names)
    for user in users:
        if session.get(ProjectMember, (project.id, user.id)) is None:
            session.add(ProjectMember(project_id=project.id, user_id=user.id))
    session.flush()
    return users


def remove_members(session: Session, project: Project, names: Iterable[str]) -> list[User]:
    """Take the named annotators off the project and release their running claims in it (their
    votes stay); flushes."""
    users = _annotators(session, names)
    now = utcnow()
    for user in users:
        session.execute(delete(ProjectMember).where(ProjectMember.project_id == project.id,
                                                    ProjectMember.user_id == user.id))
        session.execute(update(Assignment).where(Assignment.project_id == project.id, Assignment.user_id == user.id,
                                                 Assignment.lease_expires_at > now)
                        .values(lease_expires_at=now).execution_options(synchronize_session=False))
    session.flush()
    return users


def change_access(session: Session, project: Project, *, add: Iterable[str] = (), remove: Iterable[str] = (),
                  open_to_all: bool | None = None) -> dict[str, Any] | None:
    """Add the `add` annotators, then take off the `remove` ones, then open or restrict the
    project when `open_to_all` is given; flushes. The audit detail of the change
    (added, removed, open_to_all), or None when nothing was asked."""
    added, removed = list(add), list(remove)
    add_members(session, project, added)
    remove_members(session, project, removed)
    if open_to_all is not None:
        project.open_to_all = open_to_all
    session.flush()
    if not added and not removed and open_to_all is None:
        return None
    return {"added": added, "removed": removed, "open_to_all": project.open_to_all}


def access_summary(session: Session, project: Project) -> str:
    """One line: who may label `project`."""
    names = member_names(session, project)
    listed = ", ".join(names) if names else "none"
    if project.open_to_all:
        return "open to all annotators" + (f" (members: {listed})" if names else "")
    return f"members only: {listed}"
