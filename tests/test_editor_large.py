"""Nothing lost with a 50,000-word document: a save that fails keeps the buffer and the file,
and kill -9 while typing loses at most the last 2 s of typing (the recovery mirror).

The failing save is injected (EACCES from `os.replace` for the document), so it runs for
root too; the kill runs the real app with the real model in tmux.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from test_editor import ESC, wait
from test_editor import session  # noqa: F401  (fixture)
from test_editor_tmux import TMUX, morph_write, status_line
from test_editor_tmux import tmux  # noqa: F401  (fixture)

SENTENCES = [
    "The harbour was quiet in the early morning, and the boats rocked gently against the pier.",
    "She had kept the letters in a tin box for years, never quite ready to read them again.",
    "Rain moved across the valley in long grey curtains, hiding the far side of the hills.",
    "The report concluded that the bridge needed repairs before the winter storms arrived.",
    "By noon the market square was full of voices, bicycles, and the smell of fresh bread.",
]


def big_document(words: int = 50_000) -> str:
    paras, n, i = ["# A long manuscript\n"], 0, 0
    while n < words:
        para = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(4))
        paras.append(para)
        n += len(para.split())
        i += 1
    return "\n\n".join(paras) + "\n\nThe last line"


def test_failed_save_of_a_large_document_keeps_buffer_and_file(session, tmp_path, monkeypatch):  # noqa: F811
    text = big_document()
    assert len(text.split()) >= 50_000
    p = tmp_path / "book.md"
    p.write_text(text, encoding="utf-8")
    s = session(p, engine=None)
    s.send("GA and more" + ESC)
    wait(lambda: s.ed.buffer.text == text + " and more", what="edit")
    real_replace = os.replace

    def refuse(src, dst, *a, **kw):
        if Path(dst) == p:  # the document only: the recovery mirror still works
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", refuse)
    s.send(":w\r")
    wait(lambda: "Permission denied" in s.ed.message[1], what="the error")
    assert s.ed.message[0] == "message.error" and "the buffer is kept" in s.ed.message[1]
    assert p.read_text(encoding="utf-8") == text
    assert s.ed.buffer.text == text + " and more" and s.ed.ebuf.modified
    assert sorted(x.name for x in tmp_path.iterdir()) == ["book.md", "data"]  # no temp file left
    s.ed.message = ("", "")
    s.send(":wq\r")  # a failed write does not quit
    wait(lambda: "Permission denied" in s.ed.message[1], what="the error again")
    assert s.thread.is_alive()
    monkeypatch.undo()
    s.send(":wq\r")
    assert s.exited()
    assert p.read_text(encoding="utf-8") == text + " and more"


def test_undo_history_of_a_large_document_is_bounded(session, tmp_path):  # noqa: F811
    from morph.editor.buffer import MIN_UNDO_STEPS, UNDO_BYTES

    text = big_document()
    p = tmp_path / "book.md"
    p.write_text(text, encoding="utf-8")
    s = session(p, engine=None)
    s.send("GA")
    keep = max(MIN_UNDO_STEPS, UNDO_BYTES // len(text))
    for i in range(keep + 40):  # each insert after a delete is an undo step (a full copy)
        s.send("x\x7f")
    s.send("z" + ESC)
    wait(lambda: s.ed.buffer.text == text + "z", what="the edits")
    assert keep < len(s.ed.buffer._undo_stack) + 40 and len(s.ed.buffer._undo_stack) <= keep
    s.send("u")  # the newest steps are still there
    wait(lambda: s.ed.buffer.text == text, what="undo")


@pytest.mark.tmux
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_kill_9_while_typing_loses_at_most_2_s(tmux, tmp_path, data_dir):  # noqa: F811
    text = big_document()
    doc = tmp_path / "book.md"
    doc.write_text(text, encoding="utf-8")
    s = tmux.start(*morph_write(doc))
    tmux.wait_screen(s, lambda scr: "NORMAL" in status_line(scr), 60, "the editor")
    tmux.send(s, "G")
    tmux.send(s, "A")
    tmux.wait_screen(s, lambda scr: "INSERT" in status_line(scr), 10, "insert mode")
    sent: list[tuple[float, str]] = []  # (time sent, word)
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < 6.0:
        word = f" w{i}"
        tmux.type(s, word)
        sent.append((time.monotonic(), word))
        i += 1
        # mostly steady typing, now and then a pause long enough for a suggestion to stream
        time.sleep(0.5 if i % 6 == 0 else 0.08)
    t_kill = time.monotonic()
    os.kill(tmux.pid(s), signal.SIGKILL)
    tmux.wait_exit(s)
    assert doc.read_text(encoding="utf-8") == text  # the crash wrote nothing to the file
    files = list((data_dir / "recovery").glob("*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text(encoding="utf-8"))["text"]
    typed = "".join(w for _, w in sent)
    assert rec.startswith(text)
    kept = rec[len(text):]
    assert typed.startswith(kept)  # exactly the typing, in order (ghost text never accepted)
    must = "".join(w for t, w in sent if t <= t_kill - 2.0)
    assert len(must) > 40 and kept.startswith(must), (len(kept), len(must), len(typed))
