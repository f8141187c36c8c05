"""Seed UX: inline definitions and telescopic text, through the engine with active steering.

Explain (K in vi normal mode, F3, :explain): a popup at the cursor explains the word (or
the visual selection) in the context of its sentence; any key closes it.
Telescopic text (\\e \\c \\E \\C in normal mode, F4/F5, :expand/:compress [para]): the
sentence or paragraph under the cursor is rewritten longer or shorter, streamed into a
preview; Enter or y replaces the original, Esc or n keeps it. With the features at their
default strengths ([editor] choose, on by default) the preview is the choice among a ladder
of candidates generated together (morph/choose.py), shown once chosen, its rung in the title.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prompt_toolkit.filters import Condition
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout import ConditionalContainer, Dimension, Window
from prompt_toolkit.layout.controls import FormattedTextControl
from prompt_toolkit.widgets import Frame

from morph import tasks
from morph.engine.base import Request

_SENT_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_WORD = re.compile(r"[\w'’-]+")


def paragraph_span(text: str, pos: int) -> tuple[int, int]:
    """[start, end) of the paragraph (blank-line separated) around pos, without its trailing newline."""
    start = text.rfind("\n\n", 0, pos)
    start = 0 if start < 0 else start + 2
    end = text.find("\n\n", pos)
    end = len(text) if end < 0 else end
    while end > start and text[end - 1] == "\n":
        end -= 1
    while start < end and text[start] in " \t\n":
        start += 1
    return start, max(start, end)


def sentence_span(text: str, pos: int) -> tuple[int, int]:
    """[start, end) of the sentence around pos (inside its paragraph), without trailing blanks."""
    p0, p1 = paragraph_span(text, pos)
    para = text[p0:p1]
    rel = max(0, min(pos - p0, len(para)))
    start = 0
    for m in _SENT_END.finditer(para):
        if m.end() > rel or m.end() == len(para):
            end = m.end()
            break
        start = m.end()
    else:
        end = len(para)
    while start < end and para[start].isspace():
        start += 1
    return p0 + start, p0 + end


def word_at(text: str, pos: int) -> tuple[int, int] | None:
    for m in _WORD.finditer(text, max(0, pos - 64), min(len(text), pos + 64)):
        if m.start() <= pos < m.end() or (m.end() == pos and pos == len(text)):
            return m.start(), m.end()
    return None


def clean_reply(text: str) -> str:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return t


@dataclass
class Popup:
    title: str
    text: str = ""
    done: bool = False


@dataclass
class Preview:
    kind: str
    scope: str
    start: int
    end: int
    original: str
    anchor_text: str
    text: str = ""
    done: bool = False
    error: str = ""
    status: str = ""  # while writing, what it does ("choosing among 5 candidates")
    chosen: str = ""  # the ladder's rung, once chosen


class SeedUX:
    def __init__(self, editor):
        self.ed = editor
        self.popup: Popup | None = None
        self.preview: Preview | None = None
        self._repainted = False
        self._popup_win = Window(
            FormattedTextControl(self._popup_fragments, focusable=True, key_bindings=self._popup_keys(), show_cursor=False),
            width=Dimension(min=30, max=64, preferred=64),
            height=Dimension(max=10),
            wrap_lines=True,
            style="class:popup",
        )
        self._preview_win = Window(
            FormattedTextControl(self._preview_fragments, focusable=True, key_bindings=self._preview_keys(), show_cursor=False),
            width=Dimension(min=40, max=100, preferred=100),
            wrap_lines=True,
            style="class:popup",
        )

    @property
    def active(self) -> bool:
        return self.popup is not None or self.preview is not None

    def popup_container(self):
        return ConditionalContainer(self._popup_win, filter=Condition(lambda: self.popup is not None))

    def preview_container(self):
        return ConditionalContainer(
            Frame(self._preview_win, title=lambda: self._preview_title(), style="class:popup"),
            filter=Condition(lambda: self.preview is not None),
        )

    # --- explain --------------------------------------------------------------------------

    def explain(self) -> None:
        ed = self.ed
        if not self._engine_ready():
            return
        buf = ed.buffer
        text = buf.text
        if buf.selection_state is not None:
            a, b = buf.document.selection_range()
            word = text[a:b].strip()
            buf.exit_selection()
            pos = a
        else:
            span = word_at(text, buf.cursor_position)
            if span is None:
                ed.error("no word under the cursor")
                return
            word = text[span[0]:span[1]]
            pos = span[0]
        if not word:
            ed.error("no word under the cursor")
            return
        s0, s1 = sentence_span(text, pos)
        sentence = " ".join(text[s0:s1].split())
        popup = Popup(title=word[:40])
        self.popup = popup
        ed.suggest.dismiss()
        ed.app.layout.focus(self._popup_win)
        req = tasks.build_request("explain", sentence, word=word, defaults=ed.defaults, steering=ed.steering)
        self._submit("explain", self._streamer(req, lambda piece: self._popup_piece(popup, piece)),
                     lambda: self._popup_done(popup))
        ed.invalidate()

    def _popup_piece(self, popup: Popup, piece: str) -> None:
        if popup is self.popup:
            popup.text += piece
            self.ed.invalidate()

    def _popup_done(self, popup: Popup) -> None:
        if popup is self.popup:
            popup.done = True
            popup.text = popup.text.strip()
            self.ed.invalidate()

    def close_popup(self) -> None:
        self.popup = None
        self.ed.worker.cancel(("explain",))
        self._refocus()

    # --- telescopic text ------------------------------------------------------------------

    def telescope(self, kind: str, scope: str) -> None:
        ed = self.ed
        if not self._engine_ready():
            return
        text = ed.buffer.text
        pos = ed.buffer.cursor_position
        a, b = (sentence_span if scope == "sentence" else paragraph_span)(text, pos)
        original = text[a:b]
        if not original.strip():
            ed.error(f"no {scope} under the cursor")
            return
        pv = Preview(kind, scope, a, b, original, text)
        self.preview = pv
        ed.suggest.dismiss()
        ed.app.layout.focus(self._preview_win)
        text = " ".join(original.split()) if scope == "sentence" else original
        req = tasks.build_request(kind, text, scope=scope, defaults=ed.defaults, steering=ed.steering)
        stream = self._streamer(req, lambda piece: self._preview_piece(pv, piece))
        if ed.config.editor_choose and ed.open_embedder is not None and ed.features is not None:
            stream = self._chooser(pv, kind, text, scope, ed.features.steering(), stream)
        self._submit("telescope", stream, lambda: self._preview_done(pv))
        ed.invalidate()

    def _chooser(self, pv: Preview, kind: str, text: str, scope: str, steering, single):
        """The worker's job for a telescope at default strengths: the ladder's choice
        (`single`, the plain stream, where a strength was given: choose.ladder_for)."""
        from morph import choose  # numpy and the embedder's code: not before the first paint

        ed = self.ed

        def run(job):
            ladder = choose.ladder_for(ed.catalog, steering, ed.open_embedder, lambda why: ed.post(self._no_ladder, why),
                                       engine=ed.engine)
            if ladder is None:
                single(job)
                return
            if not self._repainted:  # the embedder's first opening may print (its one-time conversion)
                self._repainted = True
                ed.post(self._repaint)
            ed.post(self._preview_status, pv, f"choosing among {len(choose.RUNGS)} candidates")
            try:
                choice = choose.run(ed.engine, ladder.embedder, kind, text, ladder.features, defaults=ed.defaults,
                                    cancel=job.cancel, scope=scope)
            except KeyboardInterrupt:  # cancelled: Esc, or a newer job
                return
            ed.post(self._preview_chosen, pv, choice)

        return run

    def _repaint(self) -> None:
        self.ed.app.renderer.clear()
        self.ed.invalidate()

    def _no_ladder(self, why: str) -> None:
        self.ed.open_embedder = None  # said once; one generation from now on
        self.ed.error(f"{why}; expand/compress generate once")

    def _preview_status(self, pv: Preview, status: str) -> None:
        pv.status = status
        self.ed.invalidate()

    def _preview_chosen(self, pv: Preview, choice) -> None:
        pv.text = choice.text
        pv.chosen = choice.chosen.rung.name + ("" if choice.chosen.keeps_meaning else ", the closest")
        self.ed.invalidate()

    def _preview_piece(self, pv: Preview, piece: str) -> None:
        if pv is self.preview:
            pv.text += piece
            self.ed.invalidate()

    def _preview_done(self, pv: Preview) -> None:
        if pv is self.preview:
            pv.done = True
            pv.text = clean_reply(pv.text)
            self.ed.invalidate()

    def accept_preview(self) -> None:
        pv = self.preview
        ed = self.ed
        if pv is None:
            return
        if not pv.done:
            ed.info("still writing: wait for the preview to finish (Esc rejects)")
            return
        self.preview = None
        self._refocus()
        if ed.buffer.text != pv.anchor_text:
            ed.error("the document changed; preview discarded")
            return
        new = clean_reply(pv.text)
        if not new:
            ed.error("empty rewrite; nothing changed")
            return
        buf = ed.buffer
        buf.save_to_undo_stack()
        buf.text = pv.anchor_text[: pv.start] + new + pv.anchor_text[pv.end:]
        buf.cursor_position = pv.start
        ed.info(f"{pv.scope} {pv.kind}ed ({len(pv.original.split())} -> {len(new.split())} words); u undoes it")

    def reject_preview(self) -> None:
        self.preview = None
        self.ed.worker.cancel(("telescope",))
        self._refocus()
        self.ed.info("kept the original")

    # --- plumbing -----------------------------------------------------------------------

    def _engine_ready(self) -> bool:
        if self.ed.engine is None or self.ed.worker is None:
            self.ed.error("no model loaded")
            return False
        return True

    def _streamer(self, req: Request, on_piece):
        """A worker job streaming `req`, each piece posted to `on_piece` on the UI thread."""
        ed = self.ed

        def run(job):
            req.cancel = job.cancel
            for ev in ed.engine.stream(req):
                if ev.text:
                    ed.post(on_piece, ev.text)

        return run

    def _submit(self, kind: str, body, on_done) -> None:
        post = self.ed.post

        def run(job):
            try:
                body(job)
            finally:  # also after an error (reported by the worker): no endless "…"
                post(on_done)

        self.ed.suggest.invalidate_warm()  # chat prompts replace the KV cache's prefix
        self.ed.worker.submit(kind, run)

    def _refocus(self) -> None:
        self.ed.app.layout.focus(self.ed.buffer)
        self.ed.suggest.schedule()
        self.ed.invalidate()

    def _popup_fragments(self):
        p = self.popup
        if p is None:
            return []
        body = p.text.strip() or ("…" if not p.done else "(no answer)")
        return [("class:popup.title", f" {p.title} "), ("", "\n"), ("", body), ("class:popup.dim", "\n(any key closes)")]

    def _preview_title(self) -> str:
        pv = self.preview
        if pv is None:
            return ""
        state = "Enter/y accept · Esc/n reject" if pv.done else f"{pv.status or 'writing'}… Esc cancels"
        chosen = f", chose {pv.chosen}" if pv.chosen else ""
        return f"{pv.kind} {pv.scope}{chosen}  ({state})"

    def _preview_fragments(self):
        pv = self.preview
        if pv is None:
            return []
        return [
            ("class:preview.old", " ".join(pv.original.split()) + "\n\n"),
            ("class:preview.new", (pv.text.strip() or "…")),
        ]

    def _popup_keys(self) -> KeyBindings:
        kb = KeyBindings()

        @kb.add(Keys.Any, eager=True)
        @kb.add("escape", eager=True)
        @kb.add("enter", eager=True)
        def _(e):
            self.close_popup()

        return kb

    def _preview_keys(self) -> KeyBindings:
        kb = KeyBindings()

        @kb.add("enter", eager=True)
        @kb.add("y", eager=True)
        @kb.add("tab", eager=True)
        def _(e):
            self.accept_preview()

        @kb.add("escape", eager=True)
        @kb.add("n", eager=True)
        @kb.add("q", eager=True)
        @kb.add("c-c", eager=True)
        def _(e):
            self.reject_preview()

        @kb.add(Keys.Any, eager=True)
        def _(e):
            pass  # the document is frozen while the preview is open

        return kb
