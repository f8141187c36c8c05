"""SQLite history: $XDG_DATA_HOME/tinymorph/morph.db (stdlib sqlite3, WAL).

Schema changes are an ordered list of small migration functions; `user_version` records
how many ran. Logging must never cost the user their output: `safe()` turns a locked or
corrupt database into one warning line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from morph import paths


def _m1_core(db: sqlite3.Connection) -> None:
    db.executescript(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            command TEXT NOT NULL,          -- steer | serve | ...
            model TEXT,
            features TEXT,                  -- JSON {name: scale}
            mode TEXT,
            input TEXT,
            output TEXT,
            finish_reason TEXT,
            ttft_s REAL,
            tok_per_s REAL,
            prompt_tokens INTEGER,
            gen_tokens INTEGER,
            timings TEXT                    -- JSON, the engine's Timings
        );
        CREATE INDEX runs_ts ON runs(ts);

        CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,      -- absolute path of the user's file
            profile TEXT,                   -- JSON {feature: scale}, restored on reopen
            created REAL NOT NULL,
            updated REAL NOT NULL
        );
        CREATE TABLE versions (
            id INTEGER PRIMARY KEY,
            document_id INTEGER NOT NULL REFERENCES documents(id),
            ts REAL NOT NULL,
            content TEXT NOT NULL,
            sha256 TEXT NOT NULL
        );
        CREATE INDEX versions_doc ON versions(document_id, ts);
        CREATE TABLE suggestions (
            id INTEGER PRIMARY KEY,
            document_id INTEGER REFERENCES documents(id),
            ts REAL NOT NULL,
            action TEXT NOT NULL,           -- accepted | word | line | dismissed | cancelled
            text TEXT NOT NULL,             -- the whole suggestion shown
            accepted TEXT,                  -- the part taken into the document
            features TEXT,
            ttft_s REAL,
            tok_per_s REAL
        );

        CREATE TABLE repl_sessions (
            id INTEGER PRIMARY KEY,
            started REAL NOT NULL,
            model TEXT,
            mode TEXT,
            features TEXT,
            title TEXT
        );
        CREATE TABLE repl_turns (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES repl_sessions(id),
            ts REAL NOT NULL,
            role TEXT NOT NULL,             -- user | assistant | note
            content TEXT NOT NULL,
            features TEXT,
            timings TEXT
        );
        CREATE INDEX repl_turns_session ON repl_turns(session_id, id);
        """
    )


def _m2_chosen(db: sqlite3.Connection) -> None:
    """Steer, check, choose: which candidate of the ladder a run, a REPL reply or a ghost
    suggestion showed, with its scores (JSON; NULL when no ladder ran)."""
    db.executescript(
        """
        ALTER TABLE runs ADD COLUMN chosen TEXT;
        ALTER TABLE repl_turns ADD COLUMN chosen TEXT;
        ALTER TABLE suggestions ADD COLUMN chosen TEXT;
        """
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m1_core, _m2_chosen]


def connect(path: Path | None = None, timeout: float = 2.0) -> sqlite3.Connection:
    db = sqlite3.connect(str(path or paths.db_path()), timeout=timeout)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    migrate(db)
    return db


def migrate(db: sqlite3.Connection) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for i, step in enumerate(MIGRATIONS[version:], start=version + 1):
        with db:
            step(db)
            db.execute(f"PRAGMA user_version = {i}")


@contextlib.contextmanager
def safe(what: str = "history") -> Iterator[list]:
    """`with safe() as box:` -> box[0] is a connection; on a database error, one warning.

    The block must check `if box:` (empty when the database could not be opened). Errors
    inside the block are reported the same way and do not propagate: logging never costs
    the user their output.
    """
    db = None
    box: list = []
    try:
        db = connect()
        box.append(db)
    except sqlite3.Error as e:
        _warn(what, e)
    try:
        yield box
    except sqlite3.Error as e:
        _warn(what, e)
    finally:
        if db is not None:
            db.close()


def _warn(what: str, e: Exception) -> None:
    print(f"morph: warning: {what} not saved ({paths.db_path()}: {e})", file=sys.stderr)


def _json(v: Any) -> str | None:
    return None if v is None else json.dumps(v, sort_keys=True)


def log_run(
    db: sqlite3.Connection,
    command: str,
    model: str,
    features: dict,
    mode: str | None,
    input: str,
    output: str,
    finish_reason: str | None,
    timings: dict | None,
    chosen: dict | None = None,
) -> int:
    t = timings or {}
    with db:
        cur = db.execute(
            "INSERT INTO runs (ts, command, model, features, mode, input, output, finish_reason,"
            " ttft_s, tok_per_s, prompt_tokens, gen_tokens, timings, chosen)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                time.time(), command, model, _json(features), mode, input, output, finish_reason,
                t.get("ttft_s"), t.get("tok_per_s"), t.get("prompt_tokens"), t.get("gen_tokens"),
                _json(timings), _json(chosen),
            ),
        )
    return int(cur.lastrowid)


def recent_runs(db: sqlite3.Connection, limit: int = 20) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()


class Background:
    """Runs small writes (db rows, recovery files) on one background thread, in order.

    `submit(fn)` calls fn(db) with a lazily opened connection; `submit(fn, db=False)` calls
    fn() (file I/O that must not depend on the database). `flush()` waits for the queue.
    """

    def __init__(self, on_error: Callable[[str], None] | None = None):
        self._q: queue.Queue = queue.Queue()
        self._on_error = on_error
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="morph-db", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, db: bool = True) -> None:
        self._q.put((fn, db))

    def flush(self, timeout: float = 5.0) -> None:
        done = threading.Event()
        self._q.put(done)
        done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        db = None
        while True:
            fn = self._q.get()
            if fn is None:
                break
            if isinstance(fn, threading.Event):
                fn.set()
                continue
            fn, wants_db = fn
            try:
                if not wants_db:
                    fn()
                    continue
                if db is None:
                    db = connect()
                fn(db)
            except (sqlite3.Error, OSError) as e:
                if self._on_error is not None and (not wants_db or not self._warned):
                    self._warned = self._warned or wants_db
                    self._on_error(f"{'history' if wants_db else 'recovery file'} not saved: {e}")
        if db is not None:
            db.close()
