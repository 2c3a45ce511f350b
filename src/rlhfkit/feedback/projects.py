"""Projects and rounds: what there is to label.

These functions add to a SQLAlchemy session and flush; the caller commits, so several
steps (create a project, add its first round) land in one transaction.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.models import Item, Project, Round, published
from rlhfkit.feedback.records import CandidateSet, check_unique_ids, parse_candidate_set

MAX_OVERLAP = 100
MAX_NAME = 200
INSERT_BATCH = 2000
ID_LOOKUP_BATCH = 500
# A staged round (imports.py) untouched this long belongs to an import that was killed: a chunk
# commits every few tens of milliseconds, or waits at most the 30 s busy timeout for the lock.
STALE_STAGING = timedelta(minutes=2)


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
    """Add the next round of `project` with one item per record, in the caller's transaction
    (for a few thousand items; a large file goes through `imports.import_round`, which does
    not hold the write lock for the whole import).

    `records` are `CandidateSet`s or dicts in the import format
    (`{"prompt", "responses", "gold"?, "model_version"?, "id"?, "meta"?}`), e.g. the
    candidates just sampled from a checkpoint. `model_version` is the version the round
    sampled from; when None, the version shared by all records (if any) is used. An `id`
    may appear once in the file and never in an earlier round of the project (the export's
    `item_id` names one item). `source` and `lines` (the records' line numbers) name them in
    errors. Flushes; the caller commits.
    """
    batch = RoundRecords.parse(records, model_version, source=source, lines=lines)
    lock_project(session, project.id)
    batch.check_new_ids(session, project)
    new_round = Round(project_id=project.id, number=next_round_number(session, project.id),
                      model_version=batch.model_version)
    session.add(new_round)
    session.flush()
    for start in range(0, len(batch.sets), INSERT_BATCH):
        insert_items(session, new_round, batch, start, start + INSERT_BATCH)
    session.flush()
    return new_round


@dataclass(frozen=True)
class RoundRecords:
    """A round's records, checked: parsed, ids unique within the file, the round's model version."""

    sets: list[CandidateSet]
    lines: list[int]
    model_version: str | None
    source: str

    @classmethod
    def parse(cls, records: Iterable[CandidateSet | Mapping[str, Any]], model_version: str | None = None, *,
              source: str = "<records>", lines: list[int] | None = None) -> RoundRecords:
        sets = [r if isinstance(r, CandidateSet) else parse_candidate_set(r, path=source, line=i)
                for i, r in enumerate(records, start=1)]
        if not sets:
            raise DataError("a round needs at least one record", path=source)
        lines = lines or list(range(1, len(sets) + 1))
        check_unique_ids(((c.external_id, n) for c, n in zip(sets, lines, strict=True)), path=source)
        if model_version is None:
            versions = {c.model_version for c in sets}
            model_version = versions.pop() if len(versions) == 1 else None
        return cls(sets, lines, model_version, source)

    def check_new_ids(self, session: Session, project: Project) -> None:
        """Refuse ids already in `project` (any round, one being imported included), naming the
        earliest such line of the file. Index lookups (items (project_id, external_id))."""
        numbered = [(n, c.external_id) for n, c in zip(self.lines, self.sets, strict=True) if c.external_id]
        for start in range(0, len(numbered), ID_LOOKUP_BATCH):
            chunk = dict((external_id, n) for n, external_id in numbered[start:start + ID_LOOKUP_BATCH])
            found = session.execute(select(Item.external_id, Round.number).join(Round, Item.round_id == Round.id)
                                    .where(Item.project_id == project.id, Item.external_id.in_(list(chunk)))).all()
            if found:
                external_id, number = min(found, key=lambda row: chunk[row[0]])
                where = (f"round {number}" if number > 0 else
                         f"a round still being imported (a killed import's round is removed "
                         f"{STALE_STAGING.seconds // 60} minutes after its last write)")
                raise DataError(f"id {external_id!r} is already in {where} of project {project.name!r}",
                                path=self.source, line=chunk[external_id], field="id")


def item_count(session: Session, project_id: int) -> int:
    """Items in the project's published rounds (not in one being imported)."""
    return session.scalar(select(func.count(Item.id)).join(Round, Item.round_id == Round.id)
                          .where(Item.project_id == project_id, published()))


def lock_project(session: Session, project_id: int) -> None:
    """Lock the project row (PostgreSQL) so two imports cannot take the same round number;
    SQLite write transactions are already serialized (BEGIN IMMEDIATE)."""
    session.execute(select(Project.id).where(Project.id == project_id).with_for_update())


def next_round_number(session: Session, project_id: int) -> int:
    last = session.scalar(select(func.max(Round.number)).where(Round.project_id == project_id, published()))
    return (last or 0) + 1


def insert_items(session: Session, target: Round, batch: RoundRecords, start: int, stop: int) -> None:
    """Bulk INSERT (executemany) of records [start, stop) into `target`: several times less
    lock time and memory than one ORM object per item."""
    session.execute(insert(Item), [
        {"round_id": target.id, "project_id": target.project_id, "position": position,
         "external_id": c.external_id, "prompt": c.prompt, "responses": list(c.responses),
         "gold_ranks": None if c.gold_ranks is None else list(c.gold_ranks),
         "model_version": c.model_version or batch.model_version, "meta": dict(c.meta)}
        for position, c in enumerate(batch.sets[start:stop], start=start)])
