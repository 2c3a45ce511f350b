"""Atomic file and folder writes: readers see the old version or the new one, never a torn one.

The lowest layer of the package (beside `config`): checkpoints, exports, reports and model
conversion all write through these, so a killed process never leaves half a file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it, even
    back at once, races with threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600; the file should read like any other
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_dir(final: Path):
    """Context manager yielding a temporary folder that becomes `final` on success, its files
    and folders with the permissions the umask gives (0666/0777 & ~umask)."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.", suffix=".tmp"))
        self.tmp.chmod(0o777 & ~_umask())      # mkdtemp makes 0700
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _settle_tree(self.tmp)
        if self.final.exists():
            trash = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.final, trash)
            os.replace(self.tmp, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


def _settle_tree(root: Path) -> None:
    """Flush every file to disk, and give every file and folder the umask's permissions: some
    writers (transformers' and peft's safetensors saves) write through a private 0600
    temporary file, which would leave a shared run folder's model unreadable to the group."""
    mask = _umask()
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o777 & ~mask)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            executable = p.stat().st_mode & 0o111
            p.chmod((0o777 if executable else 0o666) & ~mask)
