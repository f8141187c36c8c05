"""The server's requests log: each request becomes a row of the history database's `runs`
table (command "serve"), like a `morph steer` run, so `morph log` shows them.

Writes happen on one background thread with one connection, off the event loop and off
the generation path. A database error costs one warning line, never a response.
"""

from __future__ import annotations

import queue
import sqlite3
import sys
import threading

from morph import paths, store

_STOP = object()


class RequestLog:
    def __init__(self):
        self._q: queue.Queue = queue.Queue()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="morph-serve-log", daemon=True)
        self._thread.start()

    def write(self, model: str, features: dict, mode: str, input: str, output: str,
              finish: str | None, timings: dict | None) -> None:
        self._q.put((model, features, mode, input, output, finish, timings))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything written so far is in the database (tests, shutdown)."""
        done = threading.Event()
        self._q.put(done)
        done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        db = None
        while True:
            item = self._q.get()
            if item is _STOP:
                break
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                if db is None:
                    db = store.connect()
                store.log_run(db, "serve", *item)
            except sqlite3.Error as e:
                if not self._warned:
                    self._warned = True
                    print(f"morph: warning: requests not logged ({paths.db_path()}: {e})", file=sys.stderr)
                if db is not None:
                    db.close()
                    db = None
        if db is not None:
            db.close()
