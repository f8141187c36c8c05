"""Crash safety: the unsaved buffer is mirrored to $XDG_DATA_HOME/tinymorph/recovery/.

One JSON file per document path (named by a hash of the absolute path), written
atomically. The editor writes it about a second after a change, removes it once the
buffer equals the file on disk, and offers it when the same path is opened again.

Liveness: the process that writes a recovery file holds an exclusive `flock` on the
sibling `<key>.lock` from its first write until it removes the file or exits (the kernel
drops the lock however the process ends, kill -9 included). Another editor that finds
the file asks whether that lock is held: held means a live process still edits the
document, whatever its executable or interpreter is called. An old file with no lock
file, or a lock nobody holds, belongs to no live process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from morph import fsutil, paths

_claims: dict[Path, int] = {}  # lock file -> our open, flock'ed descriptor
_claims_lock = threading.Lock()  # write() runs on the editor's background thread


@dataclass
class Recovered:
    path: Path  # the recovery file
    doc_path: str
    text: str
    ts: float  # seconds since the epoch, always one time.localtime() can show
    pid: int  # 0 when the file does not say

    @property
    def owner_alive(self) -> bool:
        """Another live process (not us) still edits this file: it holds the lock."""
        lock = _lock_path(self.path)
        with _claims_lock:
            if lock in _claims:
                return False  # the lock is ours: this process wrote the file
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return False  # no lock file: an old-format file, or its writer let go
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False  # no flock on this filesystem: offer the text, the user decides
        finally:
            os.close(fd)  # and with it the probe's own shared lock
        return False


def recovery_path(doc_path: Path) -> Path:
    key = hashlib.sha256(str(doc_path).encode("utf-8")).hexdigest()[:24]
    return paths.recovery_dir() / f"{key}.json"


def _lock_path(rec_path: Path) -> Path:
    return rec_path.with_suffix(".lock")


def _claim(lock: Path) -> None:
    """Hold the lock for this process (once; kept until `remove` or exit). Best effort:
    while another live process holds it, that one stays the owner."""
    with _claims_lock:
        if lock in _claims:
            return
        for _ in range(3):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    _claims[lock] = fd
                    return
                # else we locked a file its owner unlinked as it let go: take the new one
            except FileNotFoundError:
                pass  # unlinked as its owner let go, between our open and stat: again
            except OSError:  # held by a live process, or no flock on this filesystem
                os.close(fd)
                return
            os.close(fd)


def _hold(lock: Path) -> int | None:
    """Our descriptor on the lock: the claim we keep, or the lock taken now because nobody
    holds it; -1 when there is nothing to lock; None while another live process holds it."""
    fd = _claims.pop(lock, None)
    if fd is not None:
        return fd
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return -1  # no lock file (an old file, or released): nobody to ask
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # no flock here: as before locks, the file goes
        os.close(fd)
        return -1
    return fd


def write(doc_path: Path, text: str) -> Path:
    target = recovery_path(doc_path)
    _claim(_lock_path(target))  # before the file exists: a live writer is always seen
    payload = json.dumps({"path": str(doc_path), "text": text, "ts": time.time(), "pid": os.getpid()})
    fsutil.atomic_write(target, payload.encode("utf-8"), mode=0o600)  # drafts are private
    return target


_MAX_TS = 253402300799.0  # 9999-12-31: a time the clock can show
_MAX_PID = 2**31 - 1  # pid_t


def read(doc_path: Path) -> Recovered | None:
    """The draft of doc_path, or None. A file that is not a recovery object for this document
    offers nothing; a draft whose `ts` or `pid` no morph wrote (null, text, inf, 1e30) is
    still offered, with the file's own time and pid 0 (unknown): the text is what counts."""
    p = recovery_path(doc_path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("path") != str(doc_path) or not isinstance(raw.get("text"), str):
        return None
    text = raw["text"].encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates: U+FFFD
    ts, pid = raw.get("ts"), raw.get("pid")
    if not (type(ts) in (int, float) and 0 <= ts <= _MAX_TS):  # False for NaN and inf too
        try:
            ts = p.stat().st_mtime
        except OSError:
            ts = 0.0
    if not (type(pid) is int and 0 < pid <= _MAX_PID):
        pid = 0
    return Recovered(p, raw["path"], text, float(ts), pid)


def remove(doc_path: Path) -> None:
    """Remove the recovery file and its lock: ours, or a dead owner's, never the draft of
    another live process (it goes on mirroring its own buffer)."""
    p = recovery_path(doc_path)
    lock = _lock_path(p)
    with _claims_lock:
        fd = _hold(lock)
        if fd is None:
            return
        try:
            p.unlink(missing_ok=True)  # the file first: a file without a held lock is never live
            if fd >= 0:
                lock.unlink(missing_ok=True)
        finally:
            if fd >= 0:
                os.close(fd)
