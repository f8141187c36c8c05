"""`morph steer` as a user runs it: a subprocess with pipes (no TTY), the real model; and
every command's usage errors and exit status."""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys

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
    (("--apply", "sometimes"), b"hello", "steering applies to"),  # checked at the flag, before the model loads
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
    assert select.select([p.stdout], [], [], 30)[0], "no more output within 30 s"
    first += p.stdout.read1(4096)  # still streaming: now interrupt it mid-reply
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


# --- every command: usage errors, exit codes, --gpu -------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (("steer", "--mode", "shout"), "Invalid value for '--mode'"),
    (("steer", "--temperature", "9"), "Invalid value for '--temperature'"),
    (("steer", "--bogus"), "No such option"),
    (("--bogus", "steer"), "No such option"),
    (("nosuch",), "No such command 'nosuch'"),
    (("write",), "Missing argument 'FILE'"),
    (("features", "show"), "Missing argument 'NAME'"),
    (("vectors", "build", "--layer", "99"), "must be within 1..29"),
    (("vectors", "build", "--k", "9000", "--width", "64"), "must not exceed --width"),
])
def test_usage_errors_are_one_line_and_exit_1(data_dir, args, needle):
    r = morph(*args, input=b"hello", data_dir=data_dir)
    assert r.returncode == 1, r.stderr.decode()
    line = one_error_line(r)
    assert needle in line and "Usage:" not in line and "--help')" in line
    assert r.stdout == b""


def test_exit_status_is_documented_and_a_bare_group_prints_its_help(data_dir):
    r = morph("--help", data_dir=data_dir)
    assert r.returncode == 0
    text = " ".join(r.stdout.decode().split())
    assert ("Exit status: 0 done; 1 an error (bad input or usage: one `morph: error: ...` line on stderr); "
            "2 the command needs a terminal (write, repl); 130 interrupted (Ctrl-C).") in text
    r = morph("vectors", data_dir=data_dir)
    assert r.returncode == 0 and "diffmean" in r.stdout.decode() and r.stderr == b""


@pytest.mark.parametrize("args", [
    ("repl",),
    ("write", "doc.md"),
])
def test_interactive_commands_without_a_terminal_exit_2(data_dir, tmp_path, args):
    r = subprocess.run([sys.executable, "-m", "morph", *args], stdin=subprocess.DEVNULL, capture_output=True,
                       cwd=tmp_path, env=dict(os.environ, MORPH_DATA_DIR=str(data_dir)), timeout=60)
    assert "needs a terminal" in one_error_line(r)
    assert r.returncode == 2 and not (tmp_path / "doc.md").exists()


@pytest.fixture()
def vllm_installed(monkeypatch):
    """As if vLLM were importable (whatever this venv holds)."""
    import importlib.machinery
    import types

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", fake)


def _fail_import(monkeypatch, error: ImportError):
    """morph.engine.vllm raises `error` when imported."""
    import importlib

    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == "morph.engine.vllm":
            raise error
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", import_module)


def _gpu_error(model_info) -> str:
    from morph.engine import load_engine
    from morph.errors import MorphError

    with pytest.raises(MorphError) as e:
        load_engine(model_info, gpu=True)
    return str(e.value)


def test_gpu_without_vllm_says_what_to_install(model_info, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable
    _fail_import(monkeypatch, ModuleNotFoundError("No module named 'vllm'", name="vllm"))
    assert "vLLM, which is not installed: pip install 'morph[gpu]'" in _gpu_error(model_info)


def test_gpu_with_vllm_but_no_engine_module_says_so(model_info, monkeypatch, vllm_installed, data_dir):
    monkeypatch.setitem(sys.modules, "morph.engine.vllm", None)  # the module is missing
    msg = _gpu_error(model_info)
    assert "vLLM is installed, but this version of morph has no vLLM engine yet" in msg
    assert "pip install" not in msg
    from click.testing import CliRunner

    from morph.cli import cli

    r = CliRunner().invoke(cli, ["--gpu", "steer", "--no-log"], input="hello")
    assert r.exit_code == 1 and r.stderr == f"morph: error: {msg}\n" and r.stdout == ""


def test_gpu_with_vllm_but_a_failing_engine_module_says_why(model_info, monkeypatch, vllm_installed):
    _fail_import(monkeypatch, ImportError("libcudart.so.13: cannot open shared object file"))
    msg = _gpu_error(model_info)
    assert "vLLM is installed, but morph's vLLM engine failed to load: libcudart.so.13" in msg
    assert "pip install" not in msg
