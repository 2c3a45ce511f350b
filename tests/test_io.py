"""Atomic writes: the whole new file or the old one, with the permissions of any other file."""

from __future__ import annotations

import os
import stat

import pytest

from rlhfkit.io import atomic_dir, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_replaces_whole_and_follows_the_umask(tmp_path, umask_022):
    path = tmp_path / "sub" / "a.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644           # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, 123)                              # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path, umask_022):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
        assert not final.exists()
    assert (final / "w.bin").read_bytes() == b"1" and stat.S_IMODE(final.stat().st_mode) == 0o755
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "w.bin").write_bytes(b"2")
            raise RuntimeError("killed")
    assert (final / "w.bin").read_bytes() == b"1" and [p.name for p in tmp_path.iterdir()] == ["model"]
