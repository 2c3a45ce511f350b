"""Atomic writes: the whole new file or the old one, with the permissions of any other file."""

from __future__ import annotations

import os
import stat
import tempfile

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


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_dir_gives_everything_inside_the_umask_modes(tmp_path, mask, file_mode, dir_mode):
    # Writers that go through a private temporary file (mkstemp: 0600, as transformers' and
    # peft's safetensors saves do) would otherwise leave a model only its owner can read.
    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            fd, private = tempfile.mkstemp(dir=tmp)
            os.close(fd)
            os.rename(private, tmp / "weights.safetensors")
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "sub" / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    final = tmp_path / "model"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(final / "weights.safetensors") == file_mode
    assert mode(final) == mode(final / "sub") == dir_mode
    assert mode(final / "sub" / "run.sh") == dir_mode  # an executable stays executable


def test_reading_the_umask_leaves_it_unchanged(umask_022):
    from rlhfkit.io import _umask

    assert _umask() == 0o022 and os.umask(0o022) == 0o022
