"""Importing a round while annotators vote: staged, written in chunks, published at once.

Written in one transaction, a large import would hold SQLite's write lock for its whole run
(100k items ≈ 4 s on 2 cores, the 450k a 50 MiB upload allows ≈ 50 s) and every vote would
wait behind it. `import_round` instead

1. adds the round *staged*, under a negative number: every query that shows rounds, items or
   votes filters with `models.published()`, so no annotator, report or export sees it;
2. writes the items in chunks of `CHUNK`, one short transaction each, and on SQLite pauses
   `SQLITE_PAUSE_S` after each, so votes and logins interleave with the import (SQLite's
   waiting writers poll for the lock, up to 100 ms apart: an import that took the lock back
   the moment it let go would win every time and starve them);
3. gives the round the project's next number in one last short transaction: the round
   appears whole, or not at all.

Ids are checked against the project before anything is written (one error line naming the
file's line); the unique index on items (project_id, external_id) catches an id that a
concurrent import wrote meanwhile. A failed import deletes its staged round; one whose
process was killed leaves it behind, invisible, and the next import into the project deletes
it once it has gone `STALE_STAGING` without a write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.db import Database, retry_locked
from rlhfkit.feedback.models import Item, Project, Round, utcnow
from rlhfkit.feedback.projects import (
    STALE_STAGING,
    RoundRecords,
    insert_items,
    lock_project,
    next_round_number,
)
from rlhfkit.feedback.records import CandidateSet

# Items per transaction: ≈ 16 ms of insert (2 cores, SQLite) between two votes' turns at the
# write lock; 100k items take about as long in chunks of 500 as of 2000 (5.5 s vs 6.1 s).
CHUNK = 500
SQLITE_PAUSE_S = 0.1
# Called in the publishing transaction with the session and the published round: the caller's
# audit row commits with the round.
OnPublish = Callable[[Session, Round], None]


def import_round(database: Database, project_id: int, records: Iterable[CandidateSet | Mapping[str, Any]],
                 model_version: str | None = None, *, source: str = "<records>", lines: list[int] | None = None,
                 chunk: int = CHUNK, on_publish: OnPublish | None = None) -> Round:
    """Add the next round of project `project_id` without holding the write lock for the whole
    import (see the module docstring); the published round. Records and errors as
    `projects.add_round`."""
    batch = RoundRecords.parse(records, model_version, source=source, lines=lines)
    staged = _stage(database, project_id, batch)
    pause = SQLITE_PAUSE_S if database.engine.dialect.name == "sqlite" else 0.0

    def write_chunk(start: int) -> None:
        with database.write() as session:
            insert_items(session, staged, batch, start, start + chunk)
            session.execute(update(Round).where(Round.id == staged.id).values(created_at=utcnow()))
            session.commit()

    def publish() -> Round:
        with database.write() as session:
            lock_project(session, project_id)
            published = session.get(Round, staged.id)
            if published is None:  # taken for abandoned by another import after a stall of STALE_STAGING
                raise DataError("the import stalled and its unpublished round was removed; run it again",
                                path=source)
            published.number = next_round_number(session, project_id)
            published.created_at = utcnow()
            session.flush()
            if on_publish is not None:
                on_publish(session, published)
            session.commit()
            return published

    try:
        for start in range(0, len(batch.sets), chunk):
            retry_locked(lambda start=start: write_chunk(start), what=f"import of items {start}–{start + chunk}")
            if pause and start + chunk < len(batch.sets):
                time.sleep(pause)  # let the writers waiting for the lock in
        return retry_locked(publish, what="publishing the imported round")
    except IntegrityError:
        _discard(database, staged.id)
        with database.read() as session:  # which id: one that another import wrote meanwhile
            batch.check_new_ids(session, session.get(Project, project_id))
        raise DataError("an id of this file was imported into the project meanwhile", path=source) from None
    except BaseException:
        _discard(database, staged.id)
        raise


def _stage(database: Database, project_id: int, batch: RoundRecords) -> Round:
    """Three short transactions: clear abandoned staged rounds, check the ids (a read: index
    lookups, 100k ids ≈ 200 queries, not under the write lock), add the staged round."""

    def clear_abandoned() -> None:
        with database.write() as session:
            lock_project(session, project_id)
            if session.get(Project, project_id) is None:
                raise DataError(f"no project with id {project_id}")
            _drop_abandoned(session, project_id)
            session.commit()

    def add_staged() -> Round:
        with database.write() as session:
            lock_project(session, project_id)
            lowest = session.scalar(select(func.min(Round.number)).where(Round.project_id == project_id))
            staged = Round(project_id=project_id, number=min(lowest or 0, 0) - 1,
                           model_version=batch.model_version)
            session.add(staged)
            session.commit()
            return staged

    retry_locked(clear_abandoned, what="clearing abandoned imports")
    with database.read() as session:
        batch.check_new_ids(session, session.get(Project, project_id))
    return retry_locked(add_staged, what="starting the import")


def _drop_abandoned(session: Session, project_id: int) -> None:
    """Delete staged rounds of the project that no import has written to for STALE_STAGING
    (their import was killed)."""
    stale = list(session.scalars(select(Round.id).where(Round.project_id == project_id, Round.number < 0,
                                                        Round.created_at < utcnow() - STALE_STAGING)))
    for round_id in stale:
        session.execute(delete(Item).where(Item.round_id == round_id))
        session.execute(delete(Round).where(Round.id == round_id))


def _discard(database: Database, round_id: int) -> None:
    def drop() -> None:
        with database.write() as session:
            session.execute(delete(Item).where(Item.round_id == round_id))
            session.execute(delete(Round).where(Round.id == round_id, Round.number < 0))
            session.commit()

    retry_locked(drop, what="removing the failed import's round")
