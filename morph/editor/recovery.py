"""Crash safety: the unsaved buffer is mirrored to $XDG_DATA_HOME/tinymorph/recovery/.

One JSON file per document path (named by a hash of the absolute path), written
atomically. The editor writes it about a second after a change, removes it once the
buffer equals the file on disk, and offers it when the same path is opened again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from morph import fsutil, paths


@dataclass
class Recovered:
    path: Path  # the recovery file
    doc_path: str
    text: str
    ts: float
    pid: int

    @property
    def owner_alive(self) -> bool:
        """Another live process (not us) still edits this file."""
        if self.pid == os.getpid() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a recycled pid that is not morph does not count
            cmd = Path(f"/proc/{self.pid}/cmdline").read_bytes()
            return b"morph" in cmd or b"python" in cmd
        except OSError:
            return True


def recovery_path(doc_path: Path) -> Path:
    key = hashlib.sha256(str(doc_path).encode("utf-8")).hexdigest()[:24]
    return paths.recovery_dir() / f"{key}.json"


def write(doc_path: Path, text: str) -> Path:
    target = recovery_path(doc_path)
    payload = json.dumps({"path": str(doc_path), "text": text, "ts": time.time(), "pid": os.getpid()})
    fsutil.atomic_write(target, payload.encode("utf-8"), mode=0o600)  # drafts are private
    return target


def read(doc_path: Path) -> Recovered | None:
    p = recovery_path(doc_path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if raw.get("path") != str(doc_path) or not isinstance(raw.get("text"), str):
        return None
    return Recovered(p, raw["path"], raw["text"], float(raw.get("ts", 0)), int(raw.get("pid", 0)))


def remove(doc_path: Path) -> None:
    try:
        recovery_path(doc_path).unlink()
    except FileNotFoundError:
        pass
