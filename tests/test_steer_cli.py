"""`morph steer` as a user runs it: a subprocess with pipes (no TTY), the real model."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from morph.steering.vector import ControlVector

STORY = b"Once upon a time, in a small village by the sea, there lived an old fisherman who"


def morph(*args, input=b"", data_dir=None, timeout=120):
    env = dict(os.environ)
    if data_dir is not None:
        env["MORPH_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "morph", *args], input=input,
                          capture_output=True, timeout=timeout, env=env)


def one_error_line(r) -> str:
    err = r.stderr.decode()
    assert err.startswith("morph: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_rewrite_default_logs_run(data_dir):
    r = morph("steer", "--temperature", "0", "--max-tokens", "40", "-v",
              input=b"hey can u send me the report by friday", data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.strip() and out.endswith("\n")
    assert "TTFT" in r.stderr.decode() and "TTFT" not in out  # diagnostics on stderr only
    log = morph("log", "--json", data_dir=data_dir)
    rows = json.loads(log.stdout)
    assert rows[0]["command"] == "steer" and rows[0]["mode"] == "rewrite"
    assert rows[0]["input"] == "hey can u send me the report by friday"
    assert rows[0]["output"].strip() == out.strip()
    assert rows[0]["ttft_s"] > 0 and rows[0]["gen_tokens"] > 0


def test_no_log_and_continue_mode_is_deterministic(data_dir):
    a = morph("steer", "--mode", "continue", "--temperature", "0", "--max-tokens", "12", "--no-log",
              input=STORY, data_dir=data_dir)
    b = morph("steer", "--mode", "continue", "--temperature", "0.8", "--seed", "3", "--max-tokens", "12",
              "--no-log", input=STORY, data_dir=data_dir)
    c = morph("steer", "--mode", "continue", "--temperature", "0.8", "--seed", "3", "--max-tokens", "12",
              "--no-log", input=STORY, data_dir=data_dir)
    assert a.returncode == b.returncode == c.returncode == 0
    assert b.stdout == c.stdout
    assert json.loads(morph("log", "--json", data_dir=data_dir).stdout) == []
    echo = morph("steer", "--mode", "continue", "--echo", "--temperature", "0", "--max-tokens", "12",
                 "--no-log", input=STORY, data_dir=data_dir)
    assert echo.stdout == STORY + a.stdout


def test_vector_option_steers(data_dir, tmp_path, model_info):
    rng = np.random.default_rng(0)
    v = rng.standard_normal(576).astype(np.float32)
    cv = ControlVector({16: v / np.linalg.norm(v) * 150.0}, "llama")
    path = cv.save(tmp_path / "v.gguf")
    args = ("steer", "--mode", "continue", "--temperature", "0", "--max-tokens", "16", "--no-log")
    plain = morph(*args, input=STORY, data_dir=data_dir)
    steered = morph(*args, "--vector", f"{path}=1.0", input=STORY, data_dir=data_dir)
    zero = morph(*args, "--vector", f"{path}=0", input=STORY, data_dir=data_dir)
    assert plain.returncode == steered.returncode == zero.returncode == 0
    assert steered.stdout != plain.stdout
    assert zero.stdout == plain.stdout
    bad = ControlVector({3: np.ones(640, np.float32)}, "gemma3").save(tmp_path / "gemma.gguf")
    r = morph(*args, "--vector", str(bad), input=STORY, data_dir=data_dir)
    assert r.returncode == 1 and "n_embd is 576" in one_error_line(r)


@pytest.mark.parametrize("args,stdin,needle", [
    ((), b"", "no input on stdin"),
    ((), b"   \n\t", "no input on stdin"),
    ((), b"caf\xe9 au lait", "not UTF-8"),
    (("-f", "no-such-feature"), b"hello", "unknown feature"),
    (("-f", "formal=abc"), b"hello", "is not a number"),
    (("--vector", "/nonexistent/v.gguf"), b"hello", "no such control-vector file"),
])
def test_bad_input_one_line_nonzero(data_dir, args, stdin, needle):
    r = morph("steer", *args, input=stdin, data_dir=data_dir)
    assert r.returncode == 1
    assert needle in one_error_line(r)
    assert r.stdout == b""


def test_input_longer_than_context(data_dir):
    text = ("The quick brown fox jumps over the lazy dog. " * 600).encode()
    r = morph("steer", "--mode", "continue", input=text, data_dir=data_dir)
    assert r.returncode == 1 and "exceeds the context" in one_error_line(r)


def test_streams_and_ctrl_c_stops_cleanly(data_dir):
    env = dict(os.environ, MORPH_DATA_DIR=str(data_dir))
    p = subprocess.Popen([sys.executable, "-m", "morph", "steer", "--mode", "continue", "--temperature", "0.7",
                          "--seed", "1", "--max-tokens", "2000"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         # as from a terminal, even when this harness runs with SIGINT ignored (`&`)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p.stdin.write(STORY)
    p.stdin.close()
    first = p.stdout.read(1)  # blocks until the first generated byte
    assert first and p.poll() is None  # streamed: output arrives while it still runs
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    rest = p.stdout.read()
    err = p.stderr.read().decode()
    assert p.wait(timeout=30) == 130
    assert "interrupted" in err and "Traceback" not in err
    assert len(first + rest) > 1
    rows = json.loads(morph("log", "--json", data_dir=data_dir).stdout)
    assert rows and rows[0]["finish_reason"] == "cancelled"


def test_locked_or_corrupt_db_still_gives_output(data_dir):
    args = ("steer", "--mode", "continue", "--temperature", "0", "--max-tokens", "5")
    ok = morph(*args, input=STORY, data_dir=data_dir)
    assert ok.returncode == 0
    db = sqlite3.connect(str(data_dir / "morph.db"), timeout=0.1)
    db.execute("BEGIN EXCLUSIVE")
    try:
        r = morph(*args, input=STORY, data_dir=data_dir)
    finally:
        db.rollback()
        db.close()
    assert r.returncode == 0 and r.stdout == ok.stdout
    assert "warning" in r.stderr.decode() and "locked" in r.stderr.decode()
    for f in data_dir.glob("morph.db*"):
        f.unlink()
    (data_dir / "morph.db").write_bytes(b"this is not a database" * 100)
    r = morph(*args, input=STORY, data_dir=data_dir)
    assert r.returncode == 0 and r.stdout == ok.stdout
    assert "warning" in r.stderr.decode()
