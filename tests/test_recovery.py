"""Recovery files: who still edits a document is told by a lock, not by a command line.

The writer runs in a real second process started through a symlink named `editor-bin`,
so its command line says neither "python" nor "morph" (as with a bundled executable).
"""

from __future__ import annotations

import json
import os
import subprocess
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
