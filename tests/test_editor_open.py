"""The first suggestion after opening, on the real model through a two-slot engine: the
window at the end of the document is ready before the user pauses (short window at once,
full window in the background), and on reopening it comes back from the saved KV state.

No timing is asserted: what a suggestion had to evaluate says whether it waited for a
prefill (`Timings.evaluated_tokens`), and waits poll the engine's cache.
"""

from __future__ import annotations

import pytest

from morph.editor import kvcache
from morph.editor.ghost import SHORT_CHARS, WINDOW_CHARS
from morph.engine.llama import LlamaEngine

from test_editor import ESC, Session, wait

PARA = ("On day {i} the fishing boats came back to the harbour at dusk, and the nets were hung to dry "
        "along the stone wall while the gulls argued over what was left. ")
# Numbered paragraphs: windows that start at different places share no prefix (periodic
# text would, and a prefill would then extend the other window's cells).
DOC = "# Harbour notes\n\n" + "\n\n".join(
    PARA.format(i=3 * k) + PARA.format(i=3 * k + 1) + PARA.format(i=3 * k + 2) for k in range(24)
) + "\n\nIn the morning the"


@pytest.fixture()
def fresh_engine(model_info):
    made = []

    def make():
        e = LlamaEngine(model_info, n_ctx=2048, threads=1, slots=2)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


@pytest.fixture()
def open_doc(data_dir, tmp_path, fresh_engine):  # after the engines: closed before them
    made = []

    def start(engine, text=DOC, **kw):
        p = tmp_path / "doc.md"
        if not p.exists():
            p.write_text(text, encoding="utf-8")
        s = Session(p, engine=engine, debounce_ms=30, **kw)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def cached(s, before: str, short: bool = False) -> bool:
    """The engine holds the (short) window for the text `before` the cursor."""
    ctl = s.ed.suggest
    prompt = ctl._short(before) if short else ctl._window(before)[0]
    n, have = s.engine.reusable(ctl._request(prompt))
    return have == n


def suggestion_done(s, after=None):
    ctl = s.ed.suggest
    wait(lambda: ctl.current is not None and ctl.current is not after and ctl.current.done, timeout=120,
         what="suggestion")
    return ctl.current


def test_cold_open_short_window_first_then_the_full_one(open_doc, fresh_engine):
    assert len(DOC) > 2 * WINDOW_CHARS
    s = open_doc(fresh_engine())
    wait(lambda: cached(s, DOC, short=True), timeout=120, what="short window prefilled on open")
    s.send("GA")  # the end of the document
    first = suggestion_done(s)
    # No prefill in the way: the short window was there (or already the full one).
    assert first.timings.evaluated_tokens <= 2, first.timings.as_dict()
    assert first.extra["window_chars"] <= SHORT_CHARS or cached(s, DOC)
    wait(lambda: cached(s, DOC), timeout=240, what="full window prefilled in the background")
    s.send(" sun")
    second = suggestion_done(s, after=first)
    assert second.anchor_text.endswith("the sun")
    assert second.extra["window_chars"] == len(s.ed.suggest._window(DOC + " sun")[0])  # the full window now
    assert second.timings.evaluated_tokens <= 6, second.timings.as_dict()


def test_reopen_restores_the_saved_state(open_doc, fresh_engine, tmp_path):
    s = open_doc(fresh_engine())
    wait(lambda: cached(s, DOC), timeout=240, what="full window prefilled")
    s.send(":q" + "\r")
    assert s.exited()
    assert kvcache.cache_file(tmp_path / "doc.md").exists()
    s2 = open_doc(fresh_engine())  # a new process would have nothing cached either
    wait(lambda: cached(s2, DOC), timeout=30, what="state restored")
    s2.send("GA")
    first = suggestion_done(s2)
    assert first.extra["window_chars"] == len(s2.ed.suggest._window(DOC)[0]) > SHORT_CHARS
    assert first.timings.evaluated_tokens <= 2, first.timings.as_dict()


def test_no_log_saves_no_state(open_doc, fresh_engine, tmp_path):
    s = open_doc(fresh_engine(), log=False)
    wait(lambda: cached(s, DOC, short=True), timeout=120, what="short window")
    s.send(":q" + "\r")
    assert s.exited()
    assert not kvcache.cache_file(tmp_path / "doc.md").exists()


def test_a_jump_prefills_the_window_where_the_cursor_rests(open_doc, fresh_engine):
    s = open_doc(fresh_engine())
    wait(lambda: cached(s, DOC), timeout=240, what="the end's full window")
    line = 24  # a paragraph in the middle, far from the end
    s.send(f":{line}\r")
    wait(lambda: s.ed.buffer.document.cursor_position_row == line - 1, what="jump")
    before = s.ed.buffer.document.text_before_cursor
    assert len(DOC) - len(before) > WINDOW_CHARS
    wait(lambda: cached(s, before, short=True), timeout=120, what="short window at the cursor")
    s.send("iThen")
    first = suggestion_done(s)
    assert first.anchor_cursor == len(before) + 4
    assert first.timings.evaluated_tokens <= 4, first.timings.as_dict()  # "Then" and no prefill
    s.send(ESC)


def test_the_next_window_is_the_one_typing_leads_to():
    from morph.editor.ghost import NEXT_MARGIN, WINDOW_STEP, window_start

    text = DOC
    now, nxt = window_start(text), window_start(text, ahead=NEXT_MARGIN)
    typed = "x" * NEXT_MARGIN
    assert window_start(text + typed) == nxt  # where the window is once that much is typed
    # within a step of typing the start moves at most once, and to the predicted place
    starts = {window_start(text + "y" * k) for k in range(0, WINDOW_STEP, 50)}
    assert starts <= {now, window_start(text, ahead=WINDOW_STEP - 50)} and now in starts
