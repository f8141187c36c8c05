"""REPL sessions and turns in morph.db (tables repl_sessions / repl_turns).

Every write goes through `store.safe()`: a locked or broken database costs one warning,
never the conversation. The session row is created lazily on the first turn so that
opening and closing the REPL leaves no empty sessions behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from morph import store
from morph.errors import MorphError


class SessionLog:
    def __init__(self, enabled: bool, model: str, session_id: int | None = None):
        self.enabled = enabled
        self.model = model
        self.session_id = session_id

    def _ensure(self, db, mode: str, features: dict, title: str) -> int:
        if self.session_id is None:
            with db:
                cur = db.execute(
                    "INSERT INTO repl_sessions (started, model, mode, features, title) VALUES (?,?,?,?,?)",
                    (time.time(), self.model, mode, json.dumps(features, sort_keys=True), title[:80]),
                )
            self.session_id = int(cur.lastrowid)
        return self.session_id

    def turns(self, rows: list[tuple[str, str, dict, dict, dict | None]], mode: str, features: dict) -> None:
        """Append (role, content, features, meta, chosen) rows; meta (finish_reason, mode,
        timings) goes in the `timings` JSON column, chosen (a ladder's choice) in `chosen`."""
        if not self.enabled or not rows:
            return
        title = next((row[1] for row in rows if row[0] == "user"), rows[0][1])
        with store.safe("REPL turn") as box:
            if not box:
                return
            db = box[0]
            sid = self._ensure(db, mode, features, " ".join(title.split()))
            with db:
                for role, content, feats, meta, chosen in rows:
                    db.execute(
                        "INSERT INTO repl_turns (session_id, ts, role, content, features, timings, chosen)"
                        " VALUES (?,?,?,?,?,?,?)",
                        (sid, time.time(), role, content, json.dumps(feats, sort_keys=True),
                         json.dumps(meta, sort_keys=True),
                         None if chosen is None else json.dumps(chosen, sort_keys=True)),
                    )
                db.execute("UPDATE repl_sessions SET mode=?, features=? WHERE id=?",
                           (mode, json.dumps(features, sort_keys=True), sid))


@dataclass
class SessionInfo:
    id: int
    started: float
    model: str
    mode: str
    features: dict
    title: str
    n_turns: int  # user inputs (each answered by one reply)


@dataclass
class StoredTurn:
    role: str
    content: str
    features: dict
    meta: dict


def list_sessions(limit: int = 20) -> list[SessionInfo]:
    with store.safe("REPL history") as box:
        if not box:
            return []
        rows = box[0].execute(
            "SELECT s.*, (SELECT COUNT(*) FROM repl_turns t WHERE t.session_id = s.id AND t.role = 'user')"
            " AS n FROM repl_sessions s ORDER BY s.id DESC LIMIT ?", (limit,)
        ).fetchall()
    return [
        SessionInfo(r["id"], r["started"], r["model"] or "", r["mode"] or "chat",
                    _loads(r["features"]), r["title"] or "", r["n"])
        for r in rows
    ]


def load_session(session_id: int | None) -> tuple[SessionInfo, list[StoredTurn]]:
    """The given session, or the most recent one when `session_id` is None."""
    with store.safe("REPL history") as box:
        if not box:
            raise MorphError("the history database is unavailable: cannot resume")
        db = box[0]
        if session_id is None:
            row = db.execute("SELECT * FROM repl_sessions ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                raise MorphError("no REPL session to resume yet")
        else:
            row = db.execute("SELECT * FROM repl_sessions WHERE id=?", (session_id,)).fetchone()
            if row is None:
                raise MorphError(f"no REPL session #{session_id} (see `morph repl --list`)")
        turns = db.execute(
            "SELECT role, content, features, timings FROM repl_turns WHERE session_id=? ORDER BY id",
            (row["id"],),
        ).fetchall()
    info = SessionInfo(row["id"], row["started"], row["model"] or "", row["mode"] or "chat",
                       _loads(row["features"]), row["title"] or "", sum(t["role"] == "user" for t in turns))
    return info, [StoredTurn(t["role"], t["content"], _loads(t["features"]), _loads(t["timings"])) for t in turns]


def _loads(s: str | None) -> dict:
    try:
        v = json.loads(s) if s else {}
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}
