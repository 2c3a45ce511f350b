"""The lineage registry of a loop: one SQLite file in the run folder.

Every finished step of every round is a row, written in one transaction with the content
hashes of the files it produced, *after* those files were written atomically. So the registry
never names a file that is not complete, and a killed loop resumes at the first step without
a row: that step runs again from the start (each step is deterministic given its inputs and
seed; a training step also resumes from its own checkpoints).

    steps(round, step, status, outputs, started, finished, wall_s)
    artifacts(round, step, name, path, sha256, records)
    rounds(round, parent_model, model, model_sha256, config, package_version, metrics, registered)

`status` is "done", or "waiting" for a feedback step whose labels are not all in yet.
Paths are stored relative to the run folder, so a run folder can be moved or copied.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGISTRY_FILE = "registry.sqlite"
DONE, WAITING = "done", "waiting"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    round INTEGER NOT NULL, step TEXT NOT NULL, status TEXT NOT NULL, outputs TEXT NOT NULL,
    started REAL, finished REAL, wall_s REAL, PRIMARY KEY (round, step));
CREATE TABLE IF NOT EXISTS artifacts (
    round INTEGER NOT NULL, step TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, records INTEGER, PRIMARY KEY (round, step, name));
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, parent_model TEXT, model TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    config TEXT NOT NULL, package_version TEXT NOT NULL, metrics TEXT NOT NULL, registered REAL);
"""


def sha256_of(path: str | Path) -> str:
    """Content hash of a file, or of a folder (its files' relative paths and contents, sorted);
    resume checkpoints inside a model folder are not part of the model."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path            # absolute
    records: int | None = None


@dataclass(frozen=True)
class StepRow:
    round: int
    step: str
    status: str
    outputs: dict[str, Any]
    wall_s: float | None


class Registry:
    """The run folder's registry; open with `Registry(run_dir)` (creates it when new)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / REGISTRY_FILE
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def relative(self, path: str | Path) -> str:
        p = Path(path).resolve()
        return str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)

    def _stored(self, model: str) -> str:
        """A local model folder relative to the run folder; a hub id or 'embedded' as it is."""
        return self.relative(model) if Path(model).exists() else model

    def absolute(self, stored: str) -> Path:
        p = Path(stored)
        return p if p.is_absolute() else self.root / p

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- steps -----------------------------------------------------------------------------
    def step(self, round: int, step: str) -> StepRow | None:
        row = self._db.execute("SELECT round, step, status, outputs, wall_s FROM steps WHERE round = ? AND step = ?",
                               (round, step)).fetchone()
        return None if row is None else StepRow(row[0], row[1], row[2], json.loads(row[3]), row[4])

    def is_done(self, round: int, step: str) -> bool:
        row = self.step(round, step)
        return row is not None and row.status == DONE

    def steps(self) -> list[StepRow]:
        rows = self._db.execute("SELECT round, step, status, outputs, wall_s FROM steps ORDER BY round, finished")
        return [StepRow(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def record_step(self, round: int, step: str, outputs: dict[str, Any], artifacts: list[Artifact] = (), *,
                    status: str = DONE, started: float | None = None) -> None:
        """The step's row and its artifacts' hashes, in one transaction (replacing a
        "waiting" row of the same step)."""
        hashed = [(a.name, self.relative(a.path), sha256_of(a.path),
                   a.records if a.records is not None or a.path.is_dir() else count_lines(a.path))
                  for a in artifacts]
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (round, step, status, json.dumps(outputs, sort_keys=True), started, now,
                        None if started is None else round_s(now - started)))
            db.execute("DELETE FROM artifacts WHERE round = ? AND step = ?", (round, step))
            db.executemany("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?)",
                           [(round, step, *h) for h in hashed])

    def artifacts(self, round: int | None = None) -> list[dict[str, Any]]:
        query = "SELECT round, step, name, path, sha256, records FROM artifacts"
        where = "" if round is None else " WHERE round = ?"
        rows = self._db.execute(query + where + " ORDER BY round, step, name", () if round is None else (round,))
        return [dict(zip(("round", "step", "name", "path", "sha256", "records"), r)) for r in rows]

    def artifact_path(self, round: int, step: str, name: str) -> Path:
        row = self._db.execute("SELECT path FROM artifacts WHERE round = ? AND step = ? AND name = ?",
                               (round, step, name)).fetchone()
        if row is None:
            raise KeyError(f"round {round} has no artifact {step}/{name}")
        return self.absolute(row[0])

    # -- rounds ----------------------------------------------------------------------------
    def register_round(self, round: int, *, parent_model: str | None, model: str, config: dict[str, Any],
                       package_version: str, metrics: dict[str, Any]) -> None:
        digest = sha256_of(model) if Path(model).exists() else "not-a-local-model:" + model
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (round, parent_model and self._stored(parent_model), self._stored(model), digest,
                        json.dumps(config, sort_keys=True), package_version, json.dumps(metrics, sort_keys=True),
                        time.time()))

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT round, parent_model, model, model_sha256, config, package_version, metrics "
                                "FROM rounds ORDER BY round")
        return [{"round": r[0], "parent_model": r[1], "model": r[2], "model_sha256": r[3],
                 "config": json.loads(r[4]), "package_version": r[5], "metrics": json.loads(r[6])} for r in rows]

    def model_of(self, round: int) -> Path | str:
        row = self._db.execute("SELECT model FROM rounds WHERE round = ?", (round,)).fetchone()
        if row is None:
            raise KeyError(f"round {round} is not registered")
        return self.resolve_model(row[0])

    def resolve_model(self, stored: str) -> Path | str:
        """A stored model: a folder (relative to the run folder) or, as it is, a hub id / 'embedded'."""
        p = self.absolute(stored)
        return p if p.exists() else stored


def round_s(x: float) -> float:
    return float(f"{x:.1f}")
