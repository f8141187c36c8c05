"""The server's requests log: each request becomes a row of the history database's `runs`
table (command "serve"), like a `morph steer` run, so `morph log` shows them.

Writes go through store.Background (one thread, one connection), off the event loop and
off the generation path. A database error costs one warning line, never a response.
"""

from __future__ import annotations

import sys

from morph import paths, store


class RequestLog:
    def __init__(self):
        self._bg = store.Background(on_error=self._warn)

    def write(self, model: str, features: dict, mode: str, input: str, output: str,
              finish: str | None, timings: dict | None, chosen: dict | None = None) -> None:
        row = (model, features, mode, input, output, finish, timings, chosen)
        self._bg.submit(lambda db: store.log_run(db, "serve", *row))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything written so far is in the database (tests, shutdown)."""
        self._bg.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._bg.close(timeout)

    @staticmethod
    def _warn(message: str) -> None:
        print(f"morph: warning: requests log: {message} ({paths.db_path()})", file=sys.stderr)
