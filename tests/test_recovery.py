"""Recovery files: who still edits a document is told by a lock, not by a command line.

The writer runs in a real second process started through a symlink named `editor-bin`,
so its command line says neither "python" nor "morph" (as with a bundled executable).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from morph.editor import Editor, recovery

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """\
import sys
from pathlib import Path
from morph.editor import recovery
recovery.write(Path(sys.argv[1]), sys.argv[2])
print("ready", flush=True)
sys.stdin.read()  # hold on until the test closes our stdin, then exit without cleaning up
"""


@pytest.fixture()
def holder(tmp_path, data_dir):
    """start(doc, text) -> a live process that wrote doc's recovery file and edits on."""
    exe = tmp_path / "editor-bin"
    exe.symlink_to(os.path.realpath(sys.executable))
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = dict(os.environ, MORPH_DATA_DIR=str(data_dir),
               PYTHONPATH=os.pathsep.join([str(ROOT), *[p for p in sys.path if p]]))
    procs = []

    def start(doc: Path, text: str) -> subprocess.Popen:
        p = subprocess.Popen([str(exe), str(script), str(doc), text], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        procs.append(p)
        line = p.stdout.readline()
        assert line == b"ready\n", p.stderr.read().decode()
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


def test_live_writer_with_any_name_owns_the_file_until_it_exits(holder, tmp_path):
    doc = tmp_path / "doc.md"
    p = holder(doc, "their unsaved text")
    cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes()
    assert b"python" not in cmdline.lower() and b"morph" not in cmdline.lower(), cmdline
    rec = recovery.read(doc)
    assert rec is not None and rec.pid == p.pid and rec.text == "their unsaved text"
    assert rec.owner_alive
    recovery.remove(doc)  # not ours and its owner lives: the draft stays
    assert rec.path.exists()
    p.stdin.close()
    assert p.wait(10) == 0
    assert not rec.owner_alive  # exit released the lock (the file is left as after a crash)
    recovery.remove(doc)
    assert not rec.path.exists() and not list(rec.path.parent.iterdir())


def test_killed_writer_is_not_alive(holder, tmp_path):
    doc = tmp_path / "doc.md"
    p = holder(doc, "text")
    p.kill()
    p.wait(10)
    rec = recovery.read(doc)
    assert rec.pid == p.pid and not rec.owner_alive


def test_editor_leaves_a_live_writers_draft_alone(holder, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("on disk\n")
    p = holder(doc, "their draft")
    with create_pipe_input() as inp:
        ed = Editor(doc, engine=None, input=inp, output=DummyOutput(), log=False)
    assert ed.recovered is None
    assert f"open in another morph (pid {p.pid})" in ed.message[1]
    assert recovery.read(doc).text == "their draft"


def test_old_file_without_lock_is_not_alive_even_if_its_pid_runs_python(data_dir, tmp_path):
    """Files written before the lock: a pid that now belongs to some other process."""
    doc = tmp_path / "doc.md"
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        path = recovery.recovery_path(doc)
        path.write_text(json.dumps({"path": str(doc), "text": "old", "ts": 1.0, "pid": other.pid}))
        rec = recovery.read(doc)
        assert rec.text == "old" and rec.pid == other.pid
        assert not rec.owner_alive
    finally:
        other.stdin.close()
        other.wait(10)


def test_own_file_is_not_alive_and_remove_cleans_up(data_dir, tmp_path):
    doc = tmp_path / "doc.md"
    path = recovery.write(doc, "mine")
    rec = recovery.read(doc)
    assert rec.path == path and rec.pid == os.getpid() and not rec.owner_alive
    recovery.write(doc, "mine, later")  # the claim is taken once and kept
    assert recovery.read(doc).text == "mine, later"
    recovery.remove(doc)
    assert not list(path.parent.iterdir())


BAD_FILES = {  # recovery files no morph wrote: JSON, but not the object read() expects
    "null": "null",
    "list": "[]",
    "string": '"draft"',
    "ts null": '{"path": DOC, "text": "draft", "ts": null, "pid": 1}',
    "ts text": '{"path": DOC, "text": "draft", "ts": "yesterday", "pid": 1}',
    "ts object": '{"path": DOC, "text": "draft", "ts": {}, "pid": 1}',
    "ts inf": '{"path": DOC, "text": "draft", "ts": 1e999, "pid": 1}',
    "ts nan": '{"path": DOC, "text": "draft", "ts": NaN, "pid": 1}',
    "ts huge": '{"path": DOC, "text": "draft", "ts": 1e30, "pid": 1}',
    "ts negative huge": '{"path": DOC, "text": "draft", "ts": -1e30, "pid": 1}',
    "pid null": '{"path": DOC, "text": "draft", "ts": 1.0, "pid": null}',
    "pid text": '{"path": DOC, "text": "draft", "ts": 1.0, "pid": "abc"}',
    "pid list": '{"path": DOC, "text": "draft", "ts": 1.0, "pid": [1]}',
    "pid 1e30": '{"path": DOC, "text": "draft", "ts": 1.0, "pid": 1e30}',
    "pid 1e999": '{"path": DOC, "text": "draft", "ts": 1.0, "pid": 1e999}',
    "pid huge int": '{"path": DOC, "text": "draft", "ts": 1.0, "pid": 99999999999999999999999}',
    "pid true": '{"path": DOC, "text": "draft", "ts": true, "pid": true}',
    "no ts no pid": '{"path": DOC, "text": "draft"}',
    "lone surrogate": '{"path": DOC, "text": "dr\\ud800aft", "ts": 1.0, "pid": 1}',
}


def _bad_file(doc: Path, content: str) -> Path:
    path = recovery.recovery_path(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.replace("DOC", json.dumps(str(doc))))
    return path


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_malformed_recovery_file_is_ignored_or_read_with_sane_fields(data_dir, tmp_path, content):
    """Not an object: nothing to offer. An object with the document's path and text: the
    draft is offered, whatever its ts and pid say (a time the clock can show, a pid or 0)."""
    doc = tmp_path / "doc.md"
    path = _bad_file(doc, content)
    rec = recovery.read(doc)
    if not content.startswith("{"):
        assert rec is None
        return
    assert rec.text == ("dr\ufffdaft" if "ud800" in content else "draft") and rec.path == path
    rec.text.encode("utf-8")  # a lone surrogate cannot be saved: it became U+FFFD
    assert type(rec.pid) is int and rec.pid == (1 if '"pid": 1}' in content else 0)  # 0: unknown
    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.ts))  # what the editor shows
    if '"ts": 1.0,' not in content:
        assert abs(rec.ts - path.stat().st_mtime) < 1e-6  # no usable ts: the file's own time
    assert rec.owner_alive is False


@pytest.mark.parametrize("content", [BAD_FILES["ts inf"], BAD_FILES["pid 1e999"], BAD_FILES["null"]],
                         ids=["ts inf", "pid inf", "null"])
def test_editor_opens_with_a_malformed_recovery_file(data_dir, tmp_path, content):
    doc = tmp_path / "doc.md"
    doc.write_text("on disk\n")
    _bad_file(doc, content)
    with create_pipe_input() as inp:
        ed = Editor(doc, engine=None, input=inp, output=DummyOutput(), log=False)
    assert ed.buffer.text == "on disk\n"
    assert (ed.recovered is None) == (content == "null")
    assert ed.message[1] == ""
