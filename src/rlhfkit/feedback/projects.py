"""Projects and rounds: what there is to label.

These functions add to a SQLAlchemy session and flush; the caller commits, so several
steps (create a project, add its first round) land in one transaction.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.models import Item, Project, Round
from rlhfkit.feedback.records import CandidateSet, check_unique_ids, parse_candidate_set

MAX_OVERLAP = 100
MAX_NAME = 200
INSERT_BATCH = 2000


def validate_overlap(overlap: int) -> None:
    if not 1 <= overlap <= MAX_OVERLAP:
        raise DataError(f"overlap must be between 1 and {MAX_OVERLAP}", field="overlap")


def validate_project_fields(name: str, overlap: int) -> None:
    """A new project's name (one line of visible text: it goes into export file names and
    headers) and overlap."""
    if not name.strip() or len(name) > MAX_NAME:
        raise DataError(f"a project name needs 1 to {MAX_NAME} characters", field="name")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in name):
        raise DataError("a project name cannot contain line breaks, control or invisible characters", field="name")
    validate_overlap(overlap)


def create_project(session: Session, name: str, *, overlap: int = 2, guidelines_md: str = "",
                   open_to_all: bool = False) -> Project:
    """A new project whose items each go to `overlap` annotators (gold items go to all).
    Members-only unless `open_to_all` (see membership.py): the safe default."""
    validate_project_fields(name, overlap)
    if session.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise DataError(f"a project named {name!r} already exists", field="name")
    project = Project(name=name, overlap=overlap, guidelines_md=guidelines_md, open_to_all=open_to_all)
    session.add(project)
    session.flush()
    return project


def find_project(session: Session, name: str) -> Project | None:
    return session.scalar(select(Project).where(Project.name == name))


def add_round(session: Session, project: Project,
              records: Iterable[CandidateSet | Mapping[str, Any]],
              model_version: str | None = None, *, source: str = "<records>",
              lines: list[int] | None = None) -> Round:
    """Add the next round of `project` with one item per record.

    `records` are `CandidateSet`s or dicts in the import format
    (`{"prompt", "responses", "gold"?, "model_version"?, "id"?, "meta"?}`), e.g. the
    candidates just sampled from a checkpoint. `model_version` is the version the round
    sampled from; when None, the version shared by all records (if any) is used. An `id`
    may appear once in the file and never in an earlier round of the project (the export's
    `item_id` names one item). `source` and `lines` (the
    records' line numbers) name them in errors. Flushes; the caller commits.
    """
    candidate_sets = [r if isinstance(r, CandidateSet) else parse_candidate_set(r, path=source, line=i)
                      for i, r in enumerate(records, start=1)]
    if not candidate_sets:
        raise DataError("a round needs at least one record", path=source)
    # Lock the project row (PostgreSQL) so two imports cannot take the same round number or
    # the same ids; SQLite write transactions are already serialized (BEGIN IMMEDIATE).
    session.execute(select(Project.id).where(Project.id == project.id).with_for_update())
    lines = lines or list(range(1, len(candidate_sets) + 1))
    ids = check_unique_ids(((c.external_id, n) for c, n in zip(candidate_sets, lines, strict=True)), path=source)
    check_new_ids(session, project, ids, list(zip(lines, candidate_sets, strict=True)), source)
    if model_version is None:
        versions = {c.model_version for c in candidate_sets}
        model_version = versions.pop() if len(versions) == 1 else None

    last = session.scalar(select(func.max(Round.number)).where(Round.project_id == project.id))
    new_round = Round(project_id=project.id, number=(last or 0) + 1, model_version=model_version)
    session.add(new_round)
    session.flush()
    # Bulk INSERTs (executemany), not one ORM object per item: several times less lock time and memory.
    for start in range(0, len(candidate_sets), INSERT_BATCH):
        session.execute(insert(Item), [_item_row(c, new_round, position, model_version) for position, c in
                                       enumerate(candidate_sets[start:start + INSERT_BATCH], start=start)])
    session.flush()
    return new_round


def _item_row(c: CandidateSet, new_round: Round, position: int, model_version: str | None) -> dict[str, Any]:
    return {"round_id": new_round.id, "project_id": new_round.project_id, "position": position,
            "external_id": c.external_id, "prompt": c.prompt, "responses": list(c.responses),
            "gold_ranks": None if c.gold_ranks is None else list(c.gold_ranks),
            "model_version": c.model_version or model_version, "meta": dict(c.meta)}


def check_new_ids(session: Session, project: Project, ids: set[str],
                  records: list[tuple[int, CandidateSet]], source: str) -> None:
    """Refuse a file whose ids are already in `project` (any round), naming the file's line.

    Streams the project's ids (no index on external_id yet: one pass over its items)."""
    if not ids:
        return
    query = (select(Item.external_id, Round.number).join(Round, Item.round_id == Round.id)
             .where(Item.project_id == project.id, Item.external_id.is_not(None)))
    for external_id, number in session.execute(query.execution_options(yield_per=5000)):
        if external_id in ids:
            line = next(n for n, c in records if c.external_id == external_id)
            raise DataError(f"id {external_id!r} is already in round {number} of project {project.name!r}",
                            path=source, line=line, field="id")
