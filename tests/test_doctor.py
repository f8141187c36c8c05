"""`morph doctor` as a user runs it: a subprocess, the real model, generation in a child
process; a child that crashes or hangs on purpose (MORPH_TEST_CRASH) is reported, and
doctor itself exits 1 instead of dying."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from morph import crash
from morph.engine.llamacpp import has_amx


def doctor(*opts, model=None, data_dir, fault=None, timeout=300):
    env = dict(os.environ, MORPH_DATA_DIR=str(data_dir))
    env.pop("MORPH_TEST_CRASH", None)
    if fault:
        env["MORPH_TEST_CRASH"] = fault
    pre = ["--model", model] if model else []
    return subprocess.run([sys.executable, "-m", "morph", *pre, "doctor", "--threads", "1", *opts],
                          capture_output=True, text=True, timeout=timeout, env=env)


def checks(r) -> dict:
    return {c["name"]: c for c in json.loads(r.stdout)["checks"]}


def test_doctor_on_the_real_model(data_dir):
    r = doctor("--json", data_dir=data_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    c = checks(r)
    assert json.loads(r.stdout)["ok"] is True
    amx = has_amx()  # the test runs on CPUs with AMX and without
    assert c["cpu"]["details"]["simd"] and c["cpu"]["details"]["amx"] is amx
    lib = c["llama.cpp"]["details"]
    assert lib["version"] and "CPU :" in lib["system_info"] and "libggml-cpu" in lib["backend"]
    assert c["extra buffer types"]["details"]["on"] is not amx
    assert c["extra buffer types"]["details"]["why"].startswith("default: ")
    assert c["threads"]["details"]["threads"] == 1 and c["threads"]["details"]["adaptive"] is False  # 1: nothing to adapt
    assert c["model"]["status"] == "ok" and c["model"]["details"]["sha256_ok"] is True
    assert c["data dir"]["details"]["writable"] is True
    gen = c["generation"]
    assert gen["status"] == "ok" and gen["details"]["tokens"] > 1 and gen["details"]["tok_s"] > 0
    assert gen["details"]["threads"] == 1 and gen["details"]["text"].strip()
    assert c["crashes"]["summary"] == "no crash reports"


def test_doctor_reports_a_crash_in_its_child_and_exits_1(data_dir):
    r = doctor(data_dir=data_dir, fault="segv")
    assert r.returncode == 1, r.stdout + r.stderr  # doctor itself did not die (that would be -11)
    line = next(x for x in r.stdout.splitlines() if x.startswith("FAIL  generation"))
    assert "generation crashed with signal 11 (SIGSEGV) in a child process, while loading the model" in line
    report = Path(line.split("report: ")[1].split(";")[0])
    text = report.read_text()
    assert "Fatal Python error: Segmentation fault" in text and "in open_llama" in text
    assert r.stdout.splitlines()[-1] == "1 check(s) failed: generation"
    # doctor claimed the child's report: the next run does not announce it again, doctor lists it
    again = doctor("--json", data_dir=data_dir)
    assert "previous run crashed" not in again.stderr
    assert checks(again)["crashes"]["details"]["reports"][0]["path"] == str(report)


def test_doctor_reports_a_hung_child_with_its_stack(data_dir):
    r = doctor("--json", "--timeout", "5", data_dir=data_dir, fault="hang")
    assert r.returncode == 1, r.stdout + r.stderr
    gen = checks(r)["generation"]
    assert gen["status"] == "FAIL" and gen["summary"].startswith(
        "generation timed out after 5 s in a child process, while loading the model")
    assert "in open_llama" in Path(gen["details"]["report"]).read_text()  # where it hung


def test_doctor_fails_on_a_bad_model_file(data_dir, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    r = doctor(model=str(bad), data_dir=data_dir)
    assert r.returncode == 1
    out = r.stdout.splitlines()
    assert any(x.startswith("FAIL  model") and "broken.gguf" in x for x in out), r.stdout
    assert any(x.startswith("FAIL  generation") and "skipped: no usable model" in x for x in out)
    assert not list(crash.crash_dir(data_dir).glob("*"))  # nothing crashed, nothing left behind
