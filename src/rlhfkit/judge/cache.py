"""An on-disk cache of judge completions, so a rerun of the same judging costs nothing.

One SQLite file (stdlib `sqlite3`, write-ahead log so a reader never blocks the writer).
The key is the sha256 of (backend name, model, template, request), JSON-encoded — the
request being the full rendered chat conversation, which already contains the prompt and
both responses in the order they were shown. What is stored is the judge's raw text, not
the parsed verdict, so a change to the verdict parser never needs a rerun of the judge.

Sampling settings (temperature, max tokens) are not in the key: a judge is meant to be
greedy; use a different file (or `clear()`) after changing them.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rlhfkit.data.schemas import Conversation, conversation_to_dicts
from rlhfkit.models.loading import cache_root

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judge_completions (
    key        TEXT PRIMARY KEY,
    backend    TEXT NOT NULL,
    model      TEXT NOT NULL,
    completion TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


def cache_key(backend_name: str, model: str, template: str, request: Conversation) -> str:
    """sha256 hex digest identifying one judge call."""
    blob = json.dumps([backend_name, model, template, conversation_to_dicts(request)],
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """`key -> completion` in a SQLite file; safe to share between threads of one process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA)
            self._conn.commit()
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a usable judge cache ({err})") from None

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """The cached completions among `keys` (missing keys are simply absent)."""
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            # SQLite limits the number of bound parameters per statement; stay well below it.
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT key, completion FROM judge_completions WHERE key IN ({marks})", chunk)
                found.update(rows.fetchall())
        return found

    def get(self, key: str) -> str | None:
        return self.get_many([key]).get(key)

    def put_many(self, entries: Mapping[str, str] | Iterable[tuple[str, str]], *,
                 backend: str = "", model: str = "") -> None:
        items = entries.items() if isinstance(entries, Mapping) else entries
        now = time.time()
        rows = [(k, backend, model, v, now) for k, v in items]
        with self._lock:
            self._conn.executemany(
                "INSERT OR REPLACE INTO judge_completions VALUES (?, ?, ?, ?, ?)", rows)
            self._conn.commit()

    def put(self, key: str, completion: str, *, backend: str = "", model: str = "") -> None:
        self.put_many([(key, completion)], backend=backend, model=model)

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM judge_completions").fetchone()[0]

    def clear(self) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM judge_completions")
            self._conn.commit()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(cache: str | None) -> JudgeCache | None:
    """The judge cache a `--cache` value names: None → the user-wide default file, 'none' → no cache."""
    if cache is not None and cache.lower() == "none":
        return None
    return JudgeCache(Path(cache) if cache else cache_root() / "judge_cache.sqlite")
