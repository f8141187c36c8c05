"""Atomic file writes: the user's file is either the old one or the new one, never half.

Temp file in the same directory, fsync, chmod, rename over the target, fsync the
directory. On failure the temp file is removed and the original is untouched; OSError
propagates so callers can keep their buffer and report it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator


def _mode_for(target: Path) -> int:
    """The file's current mode; a new file gets the umask's (not mkstemp's 0600)."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically. `mode`: None keeps the file's mode (new: umask).

    A symlink is written through (the link stays). Returns the real target path.
    """
    target = Path(os.path.realpath(path))
    if mode is None:
        mode = _mode_for(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".morph-tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return target


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that need a file name (GGUFWriter, json.dump): yield a temp path in the
    same directory; on success it replaces `path`, on failure it is removed."""
    target = Path(path)
    mode = _mode_for(target)  # shipped vectors must be readable by all
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".morph-tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
