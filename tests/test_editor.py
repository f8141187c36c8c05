"""`morph write`: the editor driven through prompt-toolkit's pipe input with a dummy output.

A fake engine (allowed for editor unit tests) streams a known reply word by word and
honours cancellation, so keys, ghost text, accept/dismiss, saving, quit guards and
recovery are checked exactly and fast. The real model drives the editor in
test_editor_model.py and test_editor_tmux.py.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from prompt_toolkit.application.current import set_app
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from morph import paths
from morph.cli import cli
from morph.config import Config
from morph.editor import Editor, recovery
from morph.editor.ghost import GHOST_STYLE, next_line, next_word, prompt_window
from morph.editor.seed import paragraph_span, sentence_span
from morph.engine.base import Event, Timings
from morph.errors import MorphError
from morph.steering.catalog import Catalog, Feature, write_entries
from morph.steering.vector import ControlVector, residual_relative

ESC, ENTER, TAB = "\x1b", "\r", "\t"
CTRL_RIGHT, CTRL_E, CTRL_S, CTRL_RBRACKET, F2 = "\x1b[1;5C", "\x05", "\x13", "\x1d", "\x1bOQ"
REPLY = " sat on the mat. It purred.\nThen it slept."


class FakeInfo:
    n_embd = 576
    n_layer = 30
    model_id = "fake-model"

    class file:
        name = "fake.gguf"


class FakeEngine:
    """Streams `reply` one word per `delay` seconds; stops at once when cancelled."""

    name = "fake"
    info = FakeInfo()

    def __init__(self, reply: str = REPLY, delay: float = 0.005):
        self.reply = reply
        self.delay = delay
        self.requests = []
        self.cancelled = 0
        self._cancel = threading.Event()

    def cancel(self):
        self._cancel.set()

    def stream(self, req):
        self.requests.append(req)
        self._cancel.clear()
        t = Timings(prompt_tokens=len(req.prompt or ""), evaluated_tokens=3)
        words = self.reply.split(" ") if req.max_tokens else []
        text = self.reply if req.messages is None else "A short answer."
        words = text.split(" ") if req.max_tokens else []
        for i, w in enumerate(words):
            if (req.cancel is not None and req.cancel.is_set()) or self._cancel.is_set():
                self.cancelled += 1
                yield Event(done=True, finish_reason="cancelled", timings=t)
                return
            time.sleep(self.delay)
            t.gen_tokens += 1
            yield Event(text=(" " if i else "") + w, token_ids=(i,))
        t.decode_s = max(1e-3, self.delay * len(words))
        yield Event(done=True, finish_reason="stop", timings=t)


def wait(cond, timeout=5.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


class Session:
    """An Editor running on its own thread, fed through a pipe."""

    def __init__(self, path, engine=None, catalog=None, keys="vi", debounce_ms=20, alternatives=3, **kw):
        self._inp_cm = create_pipe_input()
        self.inp = self._inp_cm.__enter__()
        self.engine = FakeEngine() if engine is None else engine
        cfg = Config(debounce_ms=debounce_ms, suggestion_tokens=16, alternatives=alternatives)
        self.ed = Editor(path, engine=self.engine, catalog=catalog, config=cfg, keys=keys,
                         input=self.inp, output=DummyOutput(), **kw)
        self.thread = threading.Thread(target=self.ed.run, daemon=True)
        self.thread.start()
        wait(lambda: self.ed.loop is not None and self.ed.app.is_running, what="app start")

    def send(self, text: str):
        self.inp.send_text(text)

    def wait_ghost(self, done=True):
        s = self.ed.suggest
        wait(lambda: s.visible() and (s.current.done or not done), what="ghost text")
        return s.text

    def close(self):
        if self.thread.is_alive():
            self.ed.post(self.ed.app.exit)
            self.thread.join(5)
        self._inp_cm.__exit__(None, None, None)

    def exited(self, timeout=5.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture()
def session(data_dir, tmp_path):
    made = []

    def start(path=None, text=None, **kw):
        p = Path(path or tmp_path / "doc.md")
        if text is not None:
            p.write_text(text, encoding="utf-8")
        s = Session(p, **kw)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def make_catalog(name="testfeat", layer=16):
    """A random direction registered in the private data dir (no shipped features needed)."""
    d = paths.user_vectors_dir() / FakeInfo.model_id
    rng = np.random.default_rng(0)
    v = residual_relative(rng.standard_normal(FakeInfo.n_embd).astype(np.float32), 150.0)
    ControlVector({layer: v}, "llama", {"name": name}).save(d / f"{name}.gguf")
    write_entries(d, [Feature(name=name, description="a random test direction", method="diffmean",
                              file=f"{name}.gguf", layer=layer, default_scale=0.1, residual_norm=150.0)],
                  FakeInfo.model_id)
    return Catalog(FakeInfo.model_id)


def db_rows(sql, *args):
    """Rows, or [] while the editor's background writer has not created the tables yet."""
    db = sqlite3.connect(paths.db_path())
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    finally:
        db.close()


# --- pure helpers ------------------------------------------------------------------------


def test_prompt_window_start_is_stable_while_typing():
    text = ("word " * 300 + "\n\n") * 5
    w1 = prompt_window(text, max_chars=4000, step=1000)
    assert len(w1) <= 4000
    start1 = len(text) - len(w1)
    for extra in ("a", "abc def", "x" * 400):
        w2 = prompt_window(text + extra, max_chars=4000, step=1000)
        assert len(text + extra) - len(w2) == start1  # same start: KV prefix reusable
    starts = set()
    for n in range(0, 3000, 7):  # typing 3,000 more characters moves the start only in steps
        t = text + "y" * n
        w = prompt_window(t, max_chars=4000, step=1000)
        assert 2000 <= len(w) <= 4000
        starts.add(len(t) - len(w))
    assert len(starts) <= 4
    assert prompt_window("short") == "short"


def test_accept_units():
    assert next_word(" sat on the mat") == " sat"
    assert next_word("mat. It") == "mat."
    assert next_line(" one line\nnext") == " one line\n"
    assert next_line(" no newline") == " no newline"


def test_sentence_and_paragraph_spans():
    text = "Title\n\nFirst one. Second one here! Third?\n\nNext para."
    i = text.index("Second") + 3
    a, b = sentence_span(text, i)
    assert text[a:b] == "Second one here!"
    a, b = paragraph_span(text, i)
    assert text[a:b] == "First one. Second one here! Third?"


# --- opening ----------------------------------------------------------------------------


def test_non_utf8_file_is_refused_and_untouched(data_dir, tmp_path):
    p = tmp_path / "latin1.txt"
    raw = "café\n".encode("latin-1")
    p.write_bytes(raw)
    with pytest.raises(MorphError, match="not UTF-8"):
        Editor(p, engine=None, output=DummyOutput())
    res = CliRunner().invoke(cli, ["write", str(p)])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "not UTF-8" in res.stderr
    assert p.read_bytes() == raw


def test_missing_file_is_created_on_first_save(session, tmp_path):
    p = tmp_path / "new.md"
    s = session(p, engine=None)
    assert s.ed.ebuf.is_new and not p.exists()
    s.send("iHello" + ESC + ":wq" + ENTER)
    assert s.exited()
    assert p.read_text() == "Hello"


# --- keys, ghost text --------------------------------------------------------------------


def test_vi_starts_in_normal_mode_and_motions_work(session):
    s = session(text="one two three\nfour five\n", engine=None)
    assert s.ed.mode_name() == "NORMAL"
    s.send("2wdw")  # count + motion + operator
    wait(lambda: s.ed.buffer.text.startswith("one two \n") or s.ed.buffer.text.startswith("one two four"),
         what="dw")
    assert s.ed.buffer.text.splitlines()[0] == "one two "
    s.send("u")
    wait(lambda: s.ed.buffer.text == "one two three\nfour five\n", what="undo")


def test_ghost_text_streams_in_insert_mode_and_tab_accepts_all(session):
    s = session(text="")
    s.send("iThe cat")
    ghost = s.wait_ghost()
    assert ghost == REPLY
    req = s.engine.requests[-1]
    assert req.prompt == "The cat" and req.stop == ["\n\n"] and req.max_tokens == 16
    s.send(TAB)
    wait(lambda: s.ed.buffer.text == "The cat" + REPLY, what="accept all")
    rows = db_rows("SELECT action, text, accepted FROM suggestions")
    wait(lambda: db_rows("SELECT action FROM suggestions"), what="suggestion log")
    rows = db_rows("SELECT action, text, accepted, features, ttft_s FROM suggestions")
    assert rows[-1]["action"] == "accepted" and rows[-1]["accepted"] == REPLY
    assert rows[-1]["ttft_s"] is not None and json.loads(rows[-1]["features"]) == {}


def test_accept_word_then_line(session):
    s = session(text="")
    s.send("iThe cat")
    s.wait_ghost()
    s.send(CTRL_RIGHT)
    wait(lambda: s.ed.buffer.text == "The cat sat", what="accept word")
    assert s.ed.suggest.visible() and s.ed.suggest.text == REPLY[len(" sat"):]
    s.send(CTRL_E)
    wait(lambda: s.ed.buffer.text == "The cat sat on the mat. It purred.\n", what="accept line")
    assert s.ed.suggest.text == "Then it slept."
    s.send(CTRL_E)
    wait(lambda: s.ed.buffer.text == "The cat" + REPLY, what="accept last line")


def test_ghost_text_drawn_mid_document(session):
    doc = "# Title\n\nFirst line here\n\nLast paragraph stays below.\n"
    s = session(text=doc)
    s.send("2jA")  # end of line 3 of 5, in insert mode
    ghost = s.wait_ghost()
    assert s.engine.requests[-1].prompt == "# Title\n\nFirst line here"
    control = s.ed.main_control
    with set_app(s.ed.app):
        content = control.create_content(80, 20)
    lines = ["".join(t for _st, t, *_ in content.get_line(i)) for i in range(content.line_count)]
    first, second = ghost.split("\n")
    assert lines[2].rstrip() == "First line here" + first
    assert lines[3].rstrip() == second  # virtual line pushes the rest down
    assert lines[5].rstrip() == "Last paragraph stays below."
    assert content.line_count == doc.count("\n") + 1 + 1
    styles = [st for st, t, *_ in content.get_line(2) if t == first]
    assert styles == [GHOST_STYLE]
    assert content.cursor_position.y == 2 and content.cursor_position.x == len("First line here")
    # The document itself is unchanged until accepted.
    assert s.ed.buffer.text == doc


def test_ghost_inside_a_line_keeps_the_rest_after_it(session):
    s = session(text="Alpha beta. Omega", engine=FakeEngine(reply=" gamma"))
    s.send("f.a")  # after "beta." mid-line
    s.wait_ghost()
    with set_app(s.ed.app):
        content = s.ed.main_control.create_content(80, 5)
    line = "".join(t for _st, t, *_ in content.get_line(0))
    assert line.rstrip() == "Alpha beta. gamma Omega"


def test_typing_cancels_a_running_generation(session):
    # A reply far longer than any wait below (5,000 words at 20 ms: 100 s), so a generation
    # that ends by itself instead of being cancelled cannot pass for a cancelled one.
    eng = FakeEngine(reply=" ".join(["word"] * 5000), delay=0.02)
    s = session(text="", engine=eng)
    s.send("iThe cat")
    s.wait_ghost(done=False)
    n_req = len(eng.requests)
    s.send("s")
    wait(lambda: eng.cancelled >= 1, timeout=30, what="cancel")
    assert not s.ed.suggest.visible() or s.ed.suggest.current.anchor_text == "The cats"
    wait(lambda: len(eng.requests) > n_req and eng.requests[-1].prompt == "The cats", what="new request")


def test_escape_dismisses_and_leaves_insert_mode(session):
    s = session(text="")
    s.send("iThe cat")
    s.wait_ghost()
    s.send(ESC)
    wait(lambda: s.ed.mode_name() == "NORMAL", what="normal mode")
    assert s.ed.suggest.current is None and s.ed.buffer.text == "The cat"
    wait(lambda: db_rows("SELECT action FROM suggestions WHERE action='dismissed'"), what="dismiss log")


def test_ctrl_bracket_dismisses_and_stays_in_insert(session):
    s = session(text="")
    s.send("iThe cat")
    s.wait_ghost()
    s.send(CTRL_RBRACKET)
    wait(lambda: s.ed.suggest.current is None, what="dismiss")
    assert s.ed.mode_name() == "INSERT"
    s.send("!")
    wait(lambda: s.ed.buffer.text == "The cat!", what="typing after dismiss")


def test_emacs_mode_suggests_and_alt_f_accepts_word(session):
    s = session(text="", keys="emacs")
    assert s.ed.mode_name() == "EMACS"
    s.send("The cat")
    s.wait_ghost()
    s.send("\x1bf")
    wait(lambda: s.ed.buffer.text == "The cat sat", what="alt-f")
    s.send(ESC)
    wait(lambda: s.ed.suggest.current is None, what="esc dismiss")


# --- saving and quitting -------------------------------------------------------------------


def test_quit_guards(session):
    s = session(text="hello\n", engine=None)
    s.send("A world" + ESC + ":q" + ENTER)
    wait(lambda: "E37" in s.ed.message[1], what="E37")
    assert s.thread.is_alive()
    s.send(":q!" + ENTER)
    assert s.exited()
    assert Path(s.ed.path).read_text() == "hello\n"


def test_write_is_atomic_and_keeps_mode(session, tmp_path):
    p = tmp_path / "doc.md"
    p.write_text("one\n")
    os.chmod(p, 0o640)
    ino = p.stat().st_ino
    s = session(p, engine=None)
    s.send("Otwo" + ESC + ":w" + ENTER)
    wait(lambda: p.read_text() == "two\none\n" and not s.ed.ebuf.modified, what="write")
    assert p.stat().st_mode & 0o777 == 0o640
    assert p.stat().st_ino != ino  # renamed into place, not rewritten in place
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".doc.md.")]  # no temp left
    s.send("ddx" + CTRL_S)
    wait(lambda: p.read_text() == "ne\n", what="ctrl-s")
    s.send(":x" + ENTER)
    assert s.exited()


def test_wq_and_w_path(session, tmp_path):
    s = session(text="draft\n", engine=None)
    other = tmp_path / "copy.md"
    s.send("Anew" + ESC + f":w {other}" + ENTER)
    wait(lambda: other.exists(), what=":w PATH")
    assert other.read_text() == "draftnew\n" and s.ed.ebuf.modified  # a copy; buffer still unsaved
    s.send(f":w {other}" + ENTER)
    wait(lambda: "E13" in s.ed.message[1], what="E13")
    s.send(":wq" + ENTER)
    assert s.exited()
    assert Path(s.ed.path).read_text() == "draftnew\n"


@pytest.mark.parametrize("cmd", [":w", ":w!", ":wq", ":x"])
def test_write_to_unknown_users_home_is_one_error(session, tmp_path, cmd):
    """`~nosuchuser` cannot be expanded (pathlib raises RuntimeError): one error line, the
    buffer and the editor stay."""
    s = session(text="draft\n", engine=None)
    s.send("Anew" + ESC + f"{cmd} ~nosuchuser-morph/x.md" + ENTER)
    wait(lambda: s.ed.message[0] == "message.error", what="error")
    msg = s.ed.message[1]
    assert msg.startswith("E: not written: ~nosuchuser-morph/x.md:") and "\n" not in msg, msg
    assert "the buffer is kept" in msg
    assert s.thread.is_alive() and s.ed.app.is_running
    assert s.ed.buffer.text == "draftnew\n" and s.ed.ebuf.modified
    s.send(":wq" + ENTER)
    assert s.exited()
    assert Path(s.ed.path).read_text() == "draftnew\n"


def test_unencodable_buffer_is_one_error_and_kept(session, tmp_path):
    """A lone surrogate (e.g. pasted from a broken source) cannot be UTF-8: one error line."""
    p = tmp_path / "doc.md"
    p.write_text("keep\n")
    s = session(p, engine=None)
    s.ed.post(lambda: setattr(s.ed.buffer, "text", "bad \ud800\n"))
    wait(lambda: s.ed.ebuf.modified, what="edit")
    s.send(":w" + ENTER)
    wait(lambda: s.ed.message[0] == "message.error", what="error")
    assert s.ed.message[1] == (f"E: not written: {s.ed.ebuf.display_name}: character '\\ud800' at offset 4 "
                               "cannot be written as UTF-8 (the buffer is kept)")
    assert p.read_text() == "keep\n" and s.ed.buffer.text == "bad \ud800\n" and s.thread.is_alive()


def test_failed_save_keeps_buffer_and_file(session, tmp_path, monkeypatch):
    p = tmp_path / "doc.md"
    p.write_text("original\n")
    s = session(p, engine=None)
    s.send("Aextra" + ESC)
    wait(lambda: s.ed.buffer.text == "originalextra\n", what="edit")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    s.send(":w" + ENTER)
    wait(lambda: "No space left" in s.ed.message[1], what="error message")
    assert s.ed.message[0] == "message.error"
    assert p.read_text() == "original\n"
    assert s.ed.buffer.text == "originalextra\n" and s.ed.ebuf.modified
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".doc.md.")]
    s.ed.message = ("", "")
    s.send(":wq" + ENTER)  # a failed write does not quit
    wait(lambda: "No space left" in s.ed.message[1], what="the error again")
    assert s.thread.is_alive() and s.ed.app.is_running
    monkeypatch.undo()
    s.send(":wq" + ENTER)
    assert s.exited()
    assert p.read_text() == "originalextra\n"


@pytest.mark.parametrize("refuses", ["new files", "renames"])
def test_save_into_read_only_dir_fails_cleanly(session, tmp_path, monkeypatch, refuses):
    """A directory that refuses the save, as a read-only one does: EACCES where the save
    creates its temp file, or where it renames it over the document (injected: as root,
    whom modes do not stop, a real read-only directory needs chattr +i, which containers
    often refuse)."""
    import tempfile

    d = tmp_path / "ro"
    d.mkdir()
    p = d / "doc.md"
    p.write_text("keep\n")
    s = session(p, engine=None)
    s.send("Ax" + ESC)
    wait(lambda: s.ed.ebuf.modified, what="edit")

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    if refuses == "new files":
        mkstemp = tempfile.mkstemp

        def no_new_files(*a, **kw):
            if Path(kw.get("dir", "")) == d:
                raise denied(kw["dir"])
            return mkstemp(*a, **kw)

        monkeypatch.setattr(tempfile, "mkstemp", no_new_files)
    else:
        replace = os.replace

        def no_renames(src, dst, *a, **kw):
            if Path(dst).parent == d:
                raise denied(src)
            return replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", no_renames)
    s.send(":w" + ENTER)
    wait(lambda: s.ed.message[0] == "message.error", what="error")
    assert s.ed.message[1].startswith("E: not written:") and "Permission denied" in s.ed.message[1]
    assert "the buffer is kept" in s.ed.message[1]
    assert p.read_text() == "keep\n" and s.ed.buffer.text == "keepx\n" and s.ed.ebuf.modified
    assert os.listdir(d) == ["doc.md"]  # no temp file left behind
    monkeypatch.undo()
    s.send(":w" + ENTER)  # the kept buffer saves once the directory takes it
    wait(lambda: p.read_text() == "keepx\n", what="the save")


def test_changed_on_disk_asks_before_overwriting(session, tmp_path):
    p = tmp_path / "doc.md"
    p.write_text("mine\n")
    s = session(p, engine=None)
    s.send("Ax" + ESC)
    wait(lambda: s.ed.ebuf.modified, what="edit")
    p.write_text("theirs, longer\n")
    s.send(":w" + ENTER)
    wait(lambda: s.ed.confirm is not None, what="question")
    assert "changed on disk" in s.ed.confirm.question
    s.send("n")
    wait(lambda: s.ed.confirm is None, what="answer")
    assert p.read_text() == "theirs, longer\n"
    s.send(":w" + ENTER)
    wait(lambda: s.ed.confirm is not None, what="question again")
    s.send("y")
    wait(lambda: p.read_text() == "minex\n", what="overwrite")


# --- history, profile, recovery -------------------------------------------------------------


def test_versions_and_history_command(session, tmp_path):
    p = tmp_path / "doc.md"
    s = session(p, engine=None)
    s.send("iv1" + ESC + ":w" + ENTER)
    wait(lambda: p.exists(), what="v1")
    s.send("av2" + ESC + ":w" + ENTER)
    wait(lambda: p.read_text() == "v1v2", what="v2")
    s.send(":w" + ENTER + ":q" + ENTER)  # unchanged save: no new version
    assert s.exited()
    runner = CliRunner()
    res = runner.invoke(cli, ["history", str(p)])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()) == 2
    res = runner.invoke(cli, ["history", str(p), "--restore", "1"])
    assert res.exit_code == 0 and res.stdout == "v1"
    out = tmp_path / "restored.md"
    res = runner.invoke(cli, ["history", str(p), "--restore", "1", "-o", str(out)])
    assert res.exit_code == 0 and out.read_text() == "v1"
    res = runner.invoke(cli, ["history", str(p), "--restore", "9"])
    assert res.exit_code == 1 and "no version 9" in res.stderr
    res = runner.invoke(cli, ["history", str(tmp_path / "never.md")])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1


def test_recovery_mirror_and_restore(session, tmp_path):
    p = tmp_path / "doc.md"
    p.write_text("saved\n")
    s = session(p, engine=None)
    # The draft is mirrored MIRROR_DELAY_S after a change: the promise is "within 2 s",
    # which is what the editor asks its loop for; when the loop gets to it depends on the
    # machine's load, so the wait below only ends a test whose mirror never comes.
    from morph.editor import editor as editor_mod

    assert 0 < editor_mod.MIRROR_DELAY_S <= 2.0
    delays = []
    call_later = s.ed.loop.call_later

    def noting(delay, fn, *args, **kw):
        if getattr(fn, "__name__", "") == "_mirror":
            delays.append(delay)
        return call_later(delay, fn, *args, **kw)

    s.ed.loop.call_later = noting
    s.send("Aunsaved words" + ESC)
    rec_path = recovery.recovery_path(s.ed.path)
    wait(lambda: rec_path.exists() and json.loads(rec_path.read_text())["text"] == "savedunsaved words\n",
         timeout=30, what="recovery file")
    assert delays and all(x == editor_mod.MIRROR_DELAY_S for x in delays), delays
    # Simulate a crash: the app goes away without quitting cleanly.
    s.ed.bg.flush()
    data = json.loads(rec_path.read_text())
    data["pid"] = 999999999  # no such process
    rec_path.write_text(json.dumps(data))
    s.ed.post(s.ed.app.exit)  # gone without :q (the real kill -9 is in test_editor_tmux.py)
    s.thread.join(5)
    assert rec_path.exists() and p.read_text() == "saved\n"
    s2 = session(p, engine=None)
    wait(lambda: s2.ed.confirm is not None, what="recovery question")
    s2.send("r")
    wait(lambda: s2.ed.buffer.text == "savedunsaved words\n", what="restored")
    s2.send(":wq" + ENTER)
    assert s2.exited()
    assert p.read_text() == "savedunsaved words\n"
    assert not rec_path.exists()


def test_recovery_question_with_a_malformed_recovery_file(session, tmp_path):
    """A draft whose ts and pid no morph wrote (inf, a huge float): the question still comes,
    with the file's own time, and restoring works; a file that is JSON null is ignored."""
    p = tmp_path / "doc.md"
    p.write_text("saved\n")
    rec_path = recovery.recovery_path(p)
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    rec_path.write_text('{"path": %s, "text": "the draft\\n", "ts": 1e999, "pid": 1e999}' % json.dumps(str(p)))
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec_path.stat().st_mtime))
    s = session(p, engine=None)
    wait(lambda: s.ed.confirm is not None, what="recovery question")
    assert f"from {when}" in s.ed.confirm.question
    s.send("r")
    wait(lambda: s.ed.buffer.text == "the draft\n", what="restored")
    s.send(":wq" + ENTER)
    assert s.exited()
    assert p.read_text() == "the draft\n" and not rec_path.exists()

    rec_path.write_text("null")
    s2 = session(p, engine=None)
    s2.send("Ax" + ESC + ":wq" + ENTER)
    assert s2.exited()
    assert s2.ed.recovered is None and p.read_text() == "the draftx\n"


# --- steering panel --------------------------------------------------------------------------


def test_panel_toggles_feature_and_profile_is_restored(session, tmp_path):
    cat = make_catalog()
    p = tmp_path / "doc.md"
    p.write_text("Some text\n")
    s = session(p, catalog=cat)
    s.send(F2)
    wait(lambda: s.ed.panel.is_open, what="panel")
    s.send(" ")  # toggle the first (only) feature on
    wait(lambda: s.ed.profile == {"testfeat@diffmean": 0.1}, what="toggle")
    s.send("++")
    wait(lambda: abs(s.ed.profile["testfeat@diffmean"] - 0.2) < 1e-9, what="stronger")
    s.send(ESC)
    wait(lambda: not s.ed.panel.is_open, what="close")
    s.send("A more")
    s.wait_ghost()
    steer = s.engine.requests[-1].steering
    assert steer is not None and steer.layers == [16]
    expected = cat.get("testfeat").load_vector().directions[16] * np.float32(0.2)
    assert np.allclose(steer.directions[16], expected)
    s.send(ESC + ":q!" + ENTER)
    assert s.exited()
    s2 = session(p, catalog=cat)
    assert s2.ed.profile == {"testfeat@diffmean": 0.2}
    s2.send(":feature testfeat 0.05" + ENTER)
    wait(lambda: s2.ed.profile == {"testfeat@diffmean": 0.05}, what=":feature")
    s2.send(":feature testfeat off" + ENTER)
    wait(lambda: s2.ed.profile == {}, what=":feature off")
    s2.send(":feature nosuch 1" + ENTER)
    wait(lambda: "unknown feature" in s2.ed.message[1], what="unknown feature error")


# --- seed UX ---------------------------------------------------------------------------------


def test_explain_popup_and_telescope_preview(session):
    s = session(text="The quay was quiet. Boats slept in the dark water.\n")
    s.send("wK")  # on "quay"
    wait(lambda: s.ed.seed.popup is not None and s.ed.seed.popup.done, what="popup")
    req = s.engine.requests[-1]
    assert '"quay"' in req.messages[-1]["content"] and "The quay was quiet." in req.messages[-1]["content"]
    assert s.ed.seed.popup.text == "A short answer."
    s.send("x")  # any key closes, and is not typed
    wait(lambda: s.ed.seed.popup is None, what="popup closed")
    assert s.ed.buffer.text.startswith("The quay")
    s.send("\\c")  # compress the sentence under the cursor
    wait(lambda: s.ed.seed.preview is not None and s.ed.seed.preview.done, what="preview")
    assert "The quay was quiet." in s.engine.requests[-1].messages[-1]["content"]
    s.send("n")
    wait(lambda: s.ed.seed.preview is None, what="reject")
    assert s.ed.buffer.text.startswith("The quay was quiet.")
    s.send("\\e")
    wait(lambda: s.ed.seed.preview is not None and s.ed.seed.preview.done, what="preview 2")
    s.send("y")
    wait(lambda: s.ed.buffer.text == "A short answer. Boats slept in the dark water.\n", what="accept")


def test_markdown_lexer_lines_and_fences():
    from prompt_toolkit.document import Document

    from morph.editor.lexer import CODE_STYLE, MarkdownLexer

    doc = Document("# Title\n\nSome *emph* text.\n```\n# not a heading\n```\nafter")
    get = MarkdownLexer().lex_document(doc)
    assert any("heading" in st for st, _t in get(0))
    assert "".join(t for _s, t in get(2)) == "Some *emph* text."
    assert any("emph" in st for st, _t in get(2))
    assert get(4) == [(CODE_STYLE, "# not a heading")]
    assert not any(st == CODE_STYLE for st, _t in get(6))


def test_markdown_lexer_deferred_is_plain_until_loaded():
    from prompt_toolkit.document import Document

    from morph.editor.lexer import MarkdownLexer

    lexer = MarkdownLexer(load_now=False)
    doc = Document("# Title\n\nSome *emph* text.")
    assert lexer.lex_document(doc)(0) == [("", "# Title")]  # before pygments: the text, unstyled
    ready = threading.Event()
    lexer.load(on_ready=ready.set)
    assert ready.wait(10)
    assert any("heading" in st for st, _t in lexer.lex_document(doc)(0))


def test_the_document_shows_before_the_model_and_typing_waits_for_it(tmp_path):
    """A loader (the CLI's): the editor runs and takes keys while it loads; once the engine is
    attached the text typed meanwhile gets its suggestion."""
    doc = tmp_path / "a.md"
    doc.write_text("The cat")
    release, eng = threading.Event(), FakeEngine()
    seen_running = []

    def loader():
        release.wait(10)
        return eng, None, "fake.gguf"

    s = Session(doc, loader=loader)
    try:
        wait(lambda: s.ed._load_thread is not None, what="loading started after the first paint")
        assert s.ed.engine is None and s.ed.worker is None and "loading" in s.ed.model_name
        with pytest.raises(MorphError, match="still loading"):
            s.ed.set_feature("formal", 0.3)
        s.send("A")  # end of the line, insert mode, while the model loads
        wait(lambda: s.ed.insert_mode(), what="insert mode")
        seen_running.append(s.ed.app.is_running)
        release.set()
        assert s.wait_ghost() == REPLY
        assert s.ed.model_name == "fake.gguf" and s.ed.worker is not None
        assert eng.requests and eng.requests[-1].prompt.endswith("The cat")
    finally:
        release.set()
        s.close()
    assert seen_running == [True]


def test_a_loader_that_fails_ends_the_editor_with_its_error(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("Keep me.\n")

    def loader():
        raise MorphError("unknown feature 'nosuch'")

    with create_pipe_input() as inp:
        ed = Editor(doc, config=Config(), input=inp, output=DummyOutput(), loader=loader)
        got = []

        def run():
            try:
                ed.run()
            except MorphError as e:
                got.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(10)
    assert not t.is_alive() and [str(e) for e in got] == ["unknown feature 'nosuch'"]
    assert doc.read_text() == "Keep me.\n"


def test_editor_leaves_a_core_for_the_ui():
    from morph.cli.write import editor_threads

    assert editor_threads(None, 2) == 1
    assert editor_threads(None, 1) == 1
    assert editor_threads(None, 8) == 7
    assert editor_threads(3, 2) == 3  # an explicit choice wins


def test_crlf_and_bom_survive_a_save(session, tmp_path):
    p = tmp_path / "win.md"
    raw = "\ufeffline one\r\nline two\r\n".encode("utf-8")
    p.write_bytes(raw)
    s = session(p, engine=None)
    assert s.ed.buffer.text == "\ufeffline one\nline two\n"
    s.send("jA!" + ESC + ":wq" + ENTER)
    assert s.exited()
    assert p.read_bytes() == "\ufeffline one\r\nline two!\r\n".encode("utf-8")
