"""The editor's rows in morph.db: documents (steering profile), versions, suggestions.

Reads happen before the app starts. Writes while the app runs go through `store.Background`,
a background thread, so a locked or slow database never stalls a keystroke; errors become
one warning, never an exception in the editor.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from morph import store
from morph.store import Background  # noqa: F401  (editor.py imports it from here)


def document_id(db: sqlite3.Connection, path: Path, create: bool = True) -> int | None:
    row = db.execute("SELECT id FROM documents WHERE path = ?", (str(path),)).fetchone()
    if row is not None:
        return int(row["id"])
    if not create:
        return None
    now = time.time()
    with db:
        cur = db.execute(
            "INSERT INTO documents (path, profile, created, updated) VALUES (?, NULL, ?, ?)",
            (str(path), now, now),
        )
    return int(cur.lastrowid)


def load_profile(db: sqlite3.Connection, path: Path) -> dict[str, float] | None:
    row = db.execute("SELECT profile FROM documents WHERE path = ?", (str(path),)).fetchone()
    if row is None or not row["profile"]:
        return None
    try:
        raw = json.loads(row["profile"])
    except json.JSONDecodeError:
        return None
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}


def save_profile(db: sqlite3.Connection, path: Path, profile: dict[str, float]) -> None:
    doc = document_id(db, path)
    with db:
        db.execute(
            "UPDATE documents SET profile = ?, updated = ? WHERE id = ?",
            (json.dumps(profile, sort_keys=True), time.time(), doc),
        )


def add_version(db: sqlite3.Connection, path: Path, content: str) -> int | None:
    """Record a saved text; an unchanged save is not a new version. Returns its number."""
    doc = document_id(db, path)
    sha = hashlib.sha256(content.encode("utf-8")).hexdigest()
    last = db.execute(
        "SELECT sha256 FROM versions WHERE document_id = ? ORDER BY id DESC LIMIT 1", (doc,)
    ).fetchone()
    if last is not None and last["sha256"] == sha:
        return None
    with db:
        db.execute(
            "INSERT INTO versions (document_id, ts, content, sha256) VALUES (?, ?, ?, ?)",
            (doc, time.time(), content, sha),
        )
        db.execute("UPDATE documents SET updated = ? WHERE id = ?", (time.time(), doc))
    return len(list_versions(db, path))


def list_versions(db: sqlite3.Connection, path: Path) -> list[dict]:
    """Versions of one file, oldest first, numbered from 1."""
    doc = document_id(db, path, create=False)
    if doc is None:
        return []
    rows = db.execute(
        "SELECT id, ts, content, sha256 FROM versions WHERE document_id = ? ORDER BY id", (doc,)
    ).fetchall()
    return [
        {"n": i, "ts": r["ts"], "content": r["content"], "sha256": r["sha256"]}
        for i, r in enumerate(rows, start=1)
    ]


def log_suggestion(
    db: sqlite3.Connection,
    path: Path,
    action: str,
    text: str,
    accepted: str | None,
    features: dict,
    ttft_s: float | None,
    tok_per_s: float | None,
    chosen: dict | None = None,
) -> None:
    """`chosen`: which of the suggestion's alternatives showed, with its scores."""
    doc = document_id(db, path)
    with db:
        db.execute(
            "INSERT INTO suggestions (document_id, ts, action, text, accepted, features, ttft_s, tok_per_s, chosen)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (doc, time.time(), action, text, accepted, json.dumps(features, sort_keys=True), ttft_s, tok_per_s,
             None if chosen is None else json.dumps(chosen, sort_keys=True)),
        )


