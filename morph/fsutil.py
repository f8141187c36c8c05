"""Atomic file writes: the user's file is either the old one or the new one, never half.

Temp file in the same directory, fsync, chmod, rename over the target, fsync the
directory. On failure the temp file is removed and the original is untouched; OSError
propagates so callers can keep their buffer and report it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from morph.errors import MorphError


def user_path(path: str | os.PathLike) -> Path:
    """`path` with a leading `~` or `~user` expanded. MorphError (one line) where that cannot
    be done (no such user, no home directory), where pathlib raises RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise MorphError(f"{os.fspath(path)}: cannot expand '~' (no such user or home directory)") from None


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
    with replacing(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(os.path.realpath(path))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """`obj` as JSON (UTF-8, a final newline), written atomically."""
    return atomic_write(path, (json.dumps(obj, indent=indent) + "\n").encode("utf-8"))


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """For writers that need a file name (GGUFWriter, json.dump): yield a temp path in the
    same directory; on success it is fsynced and replaces `path` (a symlink is written
    through), then the directory is fsynced; on failure it is removed. `mode` as in
    `atomic_write`."""
    target = Path(os.path.realpath(path))
    if mode is None:
        mode = _mode_for(target)  # shipped vectors must be readable by all
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".morph-tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp, os.O_RDWR)  # the data is on disk before the name points at it
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        _fsync(target.parent, os.O_RDONLY)
    except OSError:
        pass


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
