"""EngineWorker: the one thread that talks to the engine, so the UI thread never generates.

Jobs are "latest wins": submitting a job cancels the running one (its `cancel` Event is
set, and the engine is told to stop at the next token) and replaces any job still waiting.
A job's function runs on the worker thread and hands results to the UI through `post`,
which schedules a callback on the UI's event loop (`call_soon_threadsafe`).
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

_ids = itertools.count(1)
WORKER_NICE = 10


@dataclass(eq=False)
class Job:
    kind: str  # "suggest" | "warm" | "explain" | "telescope"
    fn: Callable[["Job"], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()


class EngineWorker:
    def __init__(self, engine, on_error: Callable[[Job, BaseException], None] | None = None):
        self.engine = engine
        self._on_error = on_error
        self._cv = threading.Condition()
        self._pending: Job | None = None
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="morph-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> Job | None:
        return self._running

    def submit(self, kind: str, fn: Callable[[Job], None]) -> Job:
        job = Job(kind, fn)
        with self._cv:
            self._cancel_locked()
            self._pending = job
            self._cv.notify()
        return job

    def cancel(self, kinds: tuple[str, ...] | None = None) -> None:
        """Cancel the running and waiting jobs (only those of `kinds`, if given)."""
        with self._cv:
            self._cancel_locked(kinds)

    def _cancel_locked(self, kinds: tuple[str, ...] | None = None) -> None:
        if self._pending is not None and (kinds is None or self._pending.kind in kinds):
            self._pending.cancel.set()
            self._pending = None
        run = self._running
        if run is not None and not run.cancelled and (kinds is None or run.kind in kinds):
            run.cancel.set()
            try:
                self.engine.cancel()
            except Exception:
                pass

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cancel_locked()
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        # Generation runs at a lower priority than the UI thread (Linux threads have their
        # own nice value; llama.cpp computes on this thread when it has one thread), so a
        # keystroke wins the CPU from a running suggestion. bench/editor.py: keystroke p50
        # while streaming ~24-30 ms at nice 0 vs ~11-19 ms at nice 10 on the loaded 2-core box.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
        except (AttributeError, OSError):
            pass
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job, self._pending = self._pending, None
                self._running = job
            try:
                if not job.cancelled:
                    job.fn(job)
            except BaseException as e:  # report, never kill the worker
                if self._on_error is not None:
                    self._on_error(job, e)
            finally:
                with self._cv:
                    self._running = None
