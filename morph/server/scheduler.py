"""Run engine streams for many HTTP clients: a fair FIFO queue and worker threads.

The llama engine has one context and serves one stream at a time, so requests wait in a
first-in, first-out queue and one worker runs them in arrival order: nobody is overtaken
(threading.Lock, which the engine uses inside, makes no such promise). An engine that
batches (vLLM) says how many streams it serves at once with `max_streams`; the scheduler
then runs that many workers over the same queue and the engine batches them.

Each job carries its request's own steering vector and `cancel` event; the engine sets
the vector (and drops KV computed under another one) per request. Events cross from the
worker thread to the asyncio loop through `call_soon_threadsafe`, one per engine event.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from morph.engine.base import Event, Request
from morph.errors import MorphError


@dataclass
class Failure:
    """An error raised by the engine while running a job (becomes an error response)."""

    message: str
    internal: bool  # True: a bug or engine failure (500), False: the request's fault (400)


class Job:
    """One request in the queue: its events arrive on an asyncio queue in the loop."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, fn: Callable | None = None):
        self.request = request
        self.fn = fn  # a plain callable instead of a stream (e.g. a one-off measurement)
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = request.cancel if request.cancel is not None else threading.Event()
        request.cancel = self.cancel
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.tokens = 0  # tokens delivered so far (the worker counts them)
        self.tokens_at_cancel: int | None = None
        self.aborted = False  # cancelled by a server shutdown, not by its client

    def stop(self, aborted: bool = False) -> None:
        """Cancel the generation at its next token (thread-safe; idempotent)."""
        if not self.cancel.is_set():
            self.tokens_at_cancel = self.tokens
            self.aborted = aborted
            self.cancel.set()

    @property
    def queue_s(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted

    def _deliver(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stop()


class Scheduler:
    def __init__(self, engine, streams: int | None = None):
        self.engine = engine
        self.streams = max(1, int(streams or getattr(engine, "max_streams", 1) or 1))
        self._pending: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._cv = threading.Condition()
        self._closing = False
        self._idle = 0  # workers waiting for a job
        self._workers: list[threading.Thread] = []  # started on demand, up to `streams`

    # --- submitting -----------------------------------------------------------------------

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Job:
        return self._put(Job(request, loop))

    def call(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop,
             cancel: threading.Event | None = None) -> Job:
        """Run `fn` in queue order, alone on its worker (its result is the job's one event).
        `cancel` becomes the job's: `stop()` sets it, for an `fn` that watches it."""
        return self._put(Job(Request(prompt="", cancel=cancel), loop, fn))

    def _put(self, job: Job) -> Job:
        with self._cv:
            if self._closing:
                raise MorphError("the server is shutting down")
            self._pending.append(job)
            if self._idle < len(self._pending) and len(self._workers) < self.streams:
                t = threading.Thread(target=self._work, name=f"morph-serve-{len(self._workers)}", daemon=True)
                self._workers.append(t)
                t.start()
            self._cv.notify()
        return job

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    # --- stopping ---------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Shutdown: refuse new jobs; every queued and running stream ends at its next token."""
        with self._cv:
            self._closing = True
            jobs = list(self._pending) + list(self._running)
            self._cv.notify_all()
        for job in jobs:
            job.stop(aborted=True)

    def close(self, timeout: float = 5.0) -> None:
        self.stop_all()
        with self._cv:
            workers = list(self._workers)
        for t in workers:
            t.join(timeout)

    # --- the workers ------------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._cv:
            while not self._pending:
                if self._closing:
                    return None
                self._idle += 1
                self._cv.wait()
                self._idle -= 1
            job = self._pending.popleft()
            self._running.add(job)
            return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                job.started = time.perf_counter()
                if job.fn is not None:
                    job._deliver(job.fn())
                elif job.cancel.is_set():  # its client left (or shutdown) while it queued
                    job._deliver(Event(done=True, finish_reason="cancelled"))
                else:
                    self._run(job)
            except MorphError as e:
                job._deliver(Failure(str(e), internal=False))
            except Exception as e:  # noqa: BLE001 - one request must not take the server down
                traceback.print_exc()
                job._deliver(Failure(f"{type(e).__name__}: {e}", internal=True))
            finally:
                with self._cv:
                    self._running.discard(job)

    def _run(self, job: Job) -> None:
        for ev in self.engine.stream(job.request):
            job.tokens += len(ev.token_ids)
            job._deliver(ev)
