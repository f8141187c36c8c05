"""EditorBuffer: a prompt-toolkit Buffer plus what it does not know about the file.

File location, the text and disk state as last read or written (so "unsaved" means
buffer text != saved text, and "changed on disk" compares mtime/size/hash), line endings,
and atomic reads and writes. Bytes that are not UTF-8 are refused, never rewritten.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from prompt_toolkit.buffer import Buffer
from prompt_toolkit.document import Document

from morph import fsutil
from morph.errors import MorphError


@dataclass(frozen=True)
class DiskState:
    """What the file on disk looked like when we last read or wrote it."""

    mtime_ns: int
    size: int
    sha256: str


def read_text(path: Path) -> tuple[str, str, DiskState | None]:
    """(text with \\n line ends, newline style, disk state); a missing file is empty.

    Raises MorphError for anything we must not edit: not UTF-8, not a regular file,
    unreadable. The file is only read, never touched.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise MorphError(f"{path}: directory {path.parent} does not exist") from None
        return "", "\n", None
    except OSError as e:
        raise MorphError(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise MorphError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MorphError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MorphError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "morph write edits UTF-8 files only, the file was left untouched"
        ) from None
    if "\x00" in text:
        raise MorphError(f"{path}: looks binary (contains NUL bytes); the file was left untouched")
    newline = "\n"
    if "\r\n" in text and text.count("\r\n") == text.count("\n"):
        newline = "\r\n"  # consistently CRLF: edit with \n, write CRLF back
        text = text.replace("\r\n", "\n")
    return text, newline, DiskState(st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())


def disk_state(path: Path) -> DiskState | None:
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError:
        return None
    return DiskState(st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())


def atomic_write(path: Path, data: bytes) -> DiskState:
    """Temp file in the same directory, fsync, rename over `path`; the mode is preserved.

    On any failure the original file is intact and the temp file is removed; OSError
    propagates to the caller (who keeps the buffer and reports it).
    """
    target = fsutil.atomic_write(path, data)
    st = target.stat()
    return DiskState(st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())


UNDO_BYTES = 64 * 2**20  # text kept for undo: each step holds a whole copy of the text
MIN_UNDO_STEPS = 100


class BoundedUndoBuffer(Buffer):
    """prompt-toolkit's Buffer keeps every undo step as a full copy of the text and never
    drops one: on a 300 KB book, typing with pauses grew the process by ~0.3 MB a step.
    Keep the newest steps within UNDO_BYTES (at least MIN_UNDO_STEPS)."""

    def save_to_undo_stack(self, clear_redo_stack: bool = True) -> None:
        super().save_to_undo_stack(clear_redo_stack)
        keep = max(MIN_UNDO_STEPS, UNDO_BYTES // max(1, len(self.text)))
        stack = self._undo_stack
        if len(stack) > keep:
            del stack[: len(stack) - keep]


class EditorBuffer:
    """One open file: the prompt-toolkit Buffer and its location and saved state."""

    def __init__(self, path: str | os.PathLike, buffer: Buffer | None = None):
        self.path = fsutil.user_path(path).absolute()
        text, self.newline, self.disk = read_text(self.path)
        self.saved_text = text
        self.buffer = buffer or BoundedUndoBuffer(name="main", multiline=True)
        self.buffer.reset(Document(text, 0))  # no undo step for the initial load

    @property
    def text(self) -> str:
        return self.buffer.text

    @property
    def is_new(self) -> bool:
        return self.disk is None

    @property
    def modified(self) -> bool:
        return self.buffer.text != self.saved_text

    @property
    def display_name(self) -> str:
        try:
            return str(self.path.relative_to(Path.cwd()))
        except ValueError:
            return str(self.path)

    def encode(self, text: str | None = None) -> bytes:
        text = self.buffer.text if text is None else text
        if self.newline != "\n":
            text = text.replace("\n", self.newline)
        return text.encode("utf-8")

    def changed_on_disk(self) -> bool:
        """True if the file differs from what we read or last wrote (someone else wrote it)."""
        now = disk_state(self.path)
        if self.disk is None:
            return now is not None  # created by someone else since we opened it
        if now is None:
            return False  # deleted: writing it back is what the user wants
        if now.mtime_ns == self.disk.mtime_ns and now.size == self.disk.size:
            return False
        return now.sha256 != self.disk.sha256

    def save(self, path: Path | None = None) -> Path:
        """Write the buffer (to `path`, default its own). OSError on failure, buffer kept."""
        text = self.buffer.text
        target = self.path if path is None else fsutil.user_path(path).absolute()
        state = atomic_write(target, self.encode(text))
        if target == self.path:
            self.saved_text = text
            self.disk = state
        return target
