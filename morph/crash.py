"""Crash reports: a crash in native code (llama.cpp, numpy) leaves a file under <data>/crash/.

When a `morph` command starts (cli.main), `start` opens `crash/run-<pid>.log`, writes the
time, the command line, morph's version and the CPU flags into it, and points Python's
faulthandler at it: on SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT the stack of every
Python thread is written there before the process dies. The engine adds llama.cpp's
version and the model (`note`) when it opens one. A run that exits normally removes its
file, so nothing is left behind.

The next run finds files whose process is gone: one that holds a stack is kept as
`crash-<time>-<pid>.txt` and announced once, in one line on stderr; one without (a
process killed by SIGKILL or a closed terminal) is removed. `morph doctor` lists the kept
reports. Everything here is best effort: a data dir that cannot be written means no report,
never a failed command.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KEEP = 20  # crash reports kept (the oldest go)
FATAL = re.compile(r"^Fatal Python error: (.+)$", re.M)
_active: tuple[Path, object] | None = None  # (run file, its open file object)


@dataclass(frozen=True)
class Report:
    path: Path
    when: float  # the crashed run's start (seconds since the epoch)
    error: str  # faulthandler's "Fatal Python error: ..." reason
    command: str


def crash_dir(data_dir: Path) -> Path:
    return data_dir / "crash"


def start(data_dir: Path, argv: list[str], extra: dict[str, str]) -> list[Report]:
    """Begin this run's report; return the reports of earlier runs that crashed (each once)."""
    global _active
    if _active is not None or faulthandler.is_enabled():  # already on (PYTHONFAULTHANDLER): the user's choice
        return []
    d = crash_dir(data_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        found = collect(d)
        path = d / f"run-{os.getpid()}.log"
        fh = open(path, "w", encoding="utf-8", errors="replace")
        lines = {"time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "epoch": f"{time.time():.0f}",
                 "command": " ".join(["morph", *argv]), "pid": str(os.getpid()),
                 "python": sys.version.split()[0], **extra}
        fh.write("".join(f"{k}: {v}\n" for k, v in lines.items()) + "\n")
        fh.flush()
    except OSError:
        return []
    faulthandler.enable(file=fh, all_threads=True)
    _active = (path, fh)
    atexit.register(finish)
    return found


def note(line: str) -> None:
    """Add a line to this run's report (before any stack faulthandler writes)."""
    if _active is not None:
        try:
            _active[1].write(line.rstrip("\n") + "\n")
            _active[1].flush()
        except (OSError, ValueError):
            pass


def finish() -> None:
    """A clean exit: stop faulthandler and remove the run's file."""
    global _active
    if _active is None:
        return
    path, fh = _active
    _active = None
    faulthandler.disable()
    fh.close()
    try:
        path.unlink()
    except OSError:
        pass


def collect(d: Path, pid: int | None = None) -> list[Report]:
    """Turn the run files of dead processes (or only `pid`'s) into crash reports; the
    new reports, oldest first. Files without a stack are removed."""
    new = []
    for run in sorted(d.glob("run-*.log")):
        try:
            run_pid = int(run.stem.split("-", 1)[1])
        except ValueError:
            continue
        if (pid is not None and run_pid != pid) or (pid is None and _alive(run_pid)):
            continue
        try:
            text = run.read_text(encoding="utf-8", errors="replace")
            if not FATAL.search(text):
                run.unlink()
                continue
            head = _header(text)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(float(head.get("epoch", 0) or 0)))
            report = d / f"crash-{stamp}-{run_pid}.txt"
            os.replace(run, report)
        except (OSError, ValueError):
            continue  # another morph run took it first
        new.append(_report(report, text))
    for old in reports(d)[:-KEEP]:
        try:
            old.path.unlink()
        except OSError:
            pass
    return new


def reports(d: Path) -> list[Report]:
    """Kept crash reports, oldest first."""
    out = []
    for p in d.glob("crash-*.txt"):
        try:
            out.append(_report(p, p.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    return sorted(out, key=lambda r: r.when)


def announce(r: Report) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.when))
    return (f"morph: a previous run crashed ({r.error}, {when}, `{r.command}`); report: {r.path}; "
            "`morph doctor` checks this machine")


def _report(path: Path, text: str) -> Report:
    head = _header(text)
    m = FATAL.search(text)
    return Report(path, float(head.get("epoch", 0) or 0), m.group(1).strip() if m else "unknown",
                  head.get("command", "morph"))


def _header(text: str) -> dict[str, str]:
    head = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        k, sep, v = line.partition(": ")
        if sep:
            head[k] = v
    return head


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a stale file of an earlier process with our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours to signal
        return True
    return True
