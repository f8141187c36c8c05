"""Crash reports: a morph command that crashes in native code leaves a report under the
data dir (faulthandler's stack, the CPU flags, the command); the next run says where it
is, once; a clean run leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from morph import crash
from morph.engine.llamacpp import cpu_flags


def morph(*args, data_dir, fault=None, input=""):
    env = dict(os.environ, MORPH_DATA_DIR=str(data_dir))
    env.pop("MORPH_TEST_CRASH", None)
    if fault:
        env["MORPH_TEST_CRASH"] = fault
    return subprocess.run([sys.executable, "-m", "morph", *args], input=input, capture_output=True, text=True,
                          timeout=300, env=env)


def test_native_crash_leaves_a_report_announced_once(data_dir):
    (data_dir / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (data_dir / "config.toml").write_text("threads = 1\n")
    r = morph("steer", "--mode", "continue", "--max-tokens", "4", "--no-log", input="The sea was calm",
              data_dir=data_dir, fault="segv")
    assert r.returncode == -signal.SIGSEGV, r.stderr
    runs = list(crash.crash_dir(data_dir).glob("run-*.log"))
    assert len(runs) == 1
    text = runs[0].read_text()
    assert "command: morph steer --mode continue --max-tokens 4 --no-log" in text
    assert f"cpu_flags: {' '.join(sorted(cpu_flags()))}\n" in text and len(cpu_flags()) > 5
    assert "morph: 0.1.0" in text and "llama.cpp: llama-cpp-python 0.3." in text
    assert "Fatal Python error: Segmentation fault" in text
    # the Python stack, from the command down to the native call
    assert "in steer_cmd" in text and "in open_llama" in text

    nxt = morph("log", "-n", "1", data_dir=data_dir)
    assert nxt.returncode == 0
    lines = nxt.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("morph: a previous run crashed (Segmentation fault, "), nxt.stderr
    report = crash.crash_dir(data_dir) / lines[0].split("report: ")[1].split(";")[0].rsplit("/", 1)[1]
    assert report.is_file() and report.read_text() == text
    assert "`morph steer --mode continue --max-tokens 4 --no-log`" in lines[0]
    assert [r.path for r in crash.reports(crash.crash_dir(data_dir))] == [report]  # what doctor lists

    third = morph("log", "-n", "1", data_dir=data_dir)
    assert third.returncode == 0 and third.stderr == ""  # once per report
    assert sorted(p.name for p in crash.crash_dir(data_dir).iterdir()) == [report.name]  # clean runs leave nothing


def test_a_run_killed_without_a_stack_is_not_a_crash(data_dir):
    p = subprocess.Popen([sys.executable, "-m", "morph", "steer"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, MORPH_DATA_DIR=str(data_dir)))
    run = crash.crash_dir(data_dir) / f"run-{p.pid}.log"
    deadline = time.monotonic() + 60
    while not (run.exists() and "cpu_flags" in run.read_text()):  # the command has started (it waits on stdin)
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    p.kill()  # SIGKILL: no stack written, as when a terminal closes
    p.wait()
    r = morph("log", "-n", "1", data_dir=data_dir)
    assert r.returncode == 0 and r.stderr == ""
    assert not list(crash.crash_dir(data_dir).iterdir())
