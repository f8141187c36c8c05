"""EngineWorker: the one thread that talks to the engine, so the UI thread never generates.

Jobs are "latest wins": submitting a job cancels the running one (its `cancel` Event is
set, and the engine is told to stop at the next token) and replaces any job still waiting.
A job's function runs on the worker thread and hands results to the UI through `post`,
which schedules a callback on the UI's event loop (`call_soon_threadsafe`).

One idle job (`submit_idle`: prefilling windows the editor will need) runs only while no
other job waits or runs. A submitted job interrupts it; `pause_idle` (a keystroke)
interrupts it and holds it back until `resume_idle` (the typing pause, once its suggestion
is submitted), so that the suggestion finds the worker free. It runs again from the
start whenever it may, until it finishes uninterrupted or is replaced; so its function must
be cheap to repeat (a prefill continues where it stopped).
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
        self._idle: tuple[str, Callable[[Job], None]] | None = None
        self._idle_held = False
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

    def submit_idle(self, kind: str, fn: Callable[[Job], None]) -> None:
        """Run `fn` whenever the worker is idle, until it once finishes uninterrupted."""
        with self._cv:
            run = self._running
            if run is not None and self._idle is not None and run.kind == self._idle[0]:
                self._stop(run)  # the old idle job: replaced
            self._idle = (kind, fn)
            self._cv.notify()

    def pause_idle(self) -> None:
        """Interrupt the idle job if it runs and hold it back until `resume_idle`."""
        with self._cv:
            self._idle_held = True
            run, idle = self._running, self._idle
            if run is not None and idle is not None and run.kind == idle[0]:
                self._stop(run)

    def resume_idle(self) -> None:
        with self._cv:
            self._idle_held = False
            self._cv.notify()

    def cancel(self, kinds: tuple[str, ...] | None = None) -> None:
        """Cancel the running and waiting jobs, the idle one included (only those of `kinds`, if given)."""
        with self._cv:
            self._cancel_locked(kinds)
            if self._idle is not None and (kinds is None or self._idle[0] in kinds):
                self._idle = None

    def _cancel_locked(self, kinds: tuple[str, ...] | None = None) -> None:
        if self._pending is not None and (kinds is None or self._pending.kind in kinds):
            self._pending.cancel.set()
            self._pending = None
        run = self._running
        if run is not None and (kinds is None or run.kind in kinds):
            self._stop(run)

    def _stop(self, job: Job) -> None:
        if not job.cancelled:
            job.cancel.set()
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
                while self._pending is None and (self._idle is None or self._idle_held) and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                idle = None
                if self._pending is not None:
                    job, self._pending = self._pending, None
                else:
                    idle = self._idle
                    job = Job(*idle)
                self._running = job
            failed = False
            try:
                if not job.cancelled:
                    job.fn(job)
            except BaseException as e:  # report, never kill the worker
                failed = True
                if self._on_error is not None:
                    self._on_error(job, e)
            finally:
                with self._cv:
                    self._running = None
                    # Done (or failed: no retry loop) unless interrupted; a new one may wait.
                    if idle is not None and self._idle is idle and (failed or not job.cancelled):
                        self._idle = None
