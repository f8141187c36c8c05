"""EngineWorker's idle job: runs only while nothing else does, gives way, comes back."""

from __future__ import annotations

import threading
import time

from morph.editor.worker import EngineWorker


class Engine:
    def __init__(self):
        self.cancels = 0

    def cancel(self):
        self.cancels += 1


def wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    raise AssertionError("timed out")


def test_idle_job_gives_way_and_resumes_until_it_finishes():
    w = EngineWorker(Engine())
    log: list[str] = []
    release = threading.Event()  # the idle job's "work": done once this is set
    runs = []

    def idle(job):
        runs.append(job)
        log.append("idle start")
        while not release.is_set():
            if job.cancelled:
                log.append("idle stopped")
                return
            time.sleep(0.001)
        log.append("idle done")

    try:
        w.submit_idle("prefill", idle)
        wait(lambda: log[-1:] == ["idle start"])
        fg = threading.Event()
        w.submit("suggest", lambda job: (log.append("suggest"), fg.set()))
        wait(fg.is_set)
        wait(lambda: log.count("idle start") == 2)  # back after the foreground job
        assert log[:3] == ["idle start", "idle stopped", "suggest"]
        w.pause_idle()  # a keystroke: stopped, and held back while keys come
        wait(lambda: log[-1] == "idle stopped")
        time.sleep(0.05)
        assert log.count("idle start") == 2
        w.resume_idle()  # the typing pause
        wait(lambda: log.count("idle start") == 3)
        assert log[3:6] == ["idle start", "idle stopped", "idle start"]
        release.set()
        wait(lambda: log[-1] == "idle done")
        time.sleep(0.05)
        assert log.count("idle start") == 3  # finished: not run again
        assert len({id(j) for j in runs}) == 3 and runs[0].cancelled and not runs[-1].cancelled
    finally:
        w.close()


def test_a_new_idle_job_replaces_the_old_and_cancel_removes_it():
    w = EngineWorker(Engine())
    seen: list[str] = []
    try:
        def old(job):
            seen.append("old")
            while not job.cancelled:
                time.sleep(0.001)

        w.submit_idle("prefill", old)
        wait(lambda: seen == ["old"])
        w.submit_idle("prefill", lambda job: seen.append("new"))
        wait(lambda: seen == ["old", "new"])
        gate = threading.Event()

        def slow(job):
            seen.append("slow")
            gate.wait(2)

        w.submit_idle("prefill", slow)
        wait(lambda: seen[-1] == "slow")
        w.cancel(("prefill",))  # gone: not run again
        gate.set()
        time.sleep(0.05)
        assert seen == ["old", "new", "slow"]
    finally:
        w.close()
