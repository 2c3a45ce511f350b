"""The SQLite judge cache: keys, persistence across handles, WAL mode."""

from __future__ import annotations

import sqlite3

import pytest

from rlhfkit.data.schemas import Message
from rlhfkit.judge.cache import JudgeCache, cache_key

REQUEST = (Message("user", "Which is better?"),)


def test_key_changes_with_every_component():
    base = cache_key("openai:m", "m", "T {prompt}", REQUEST)
    assert len(base) == 64 and base == cache_key("openai:m", "m", "T {prompt}", REQUEST)
    assert len({base,
                cache_key("local:m", "m", "T {prompt}", REQUEST),
                cache_key("openai:m", "m2", "T {prompt}", REQUEST),
                cache_key("openai:m", "m", "U {prompt}", REQUEST),
                cache_key("openai:m", "m", "T {prompt}", (Message("user", "Which is worse?"),)),
                cache_key("openai:m", "m", "T {prompt}", (Message("system", "Which is better?"),)),
                }) == 6


def test_entries_persist_across_handles_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    with JudgeCache(path) as cache:
        cache.put("k1", "Verdict: A", backend="b", model="m")
        cache.put_many({"k2": "Verdict: B", "k3": "naïve ✓"})
        assert cache.get("missing") is None
    with JudgeCache(path) as cache:
        assert len(cache) == 3
        assert cache.get_many(["k1", "k3", "nope", "k1"]) == {"k1": "Verdict: A", "k3": "naïve ✓"}
        cache.clear()
        assert len(cache) == 0
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_many_keys_are_looked_up_in_chunks(tmp_path):
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        cache.put_many({f"k{i}": str(i) for i in range(1203)})
        found = cache.get_many([f"k{i}" for i in range(0, 1203, 1)])
    assert len(found) == 1203 and found["k1202"] == "1202"


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not sqlite " * 100)
    with pytest.raises(ValueError, match="notes.txt: not a usable judge cache"):
        JudgeCache(path)
