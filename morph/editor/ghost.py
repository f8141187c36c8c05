"""Ghost text: streamed suggestions drawn dim at the cursor, anywhere in the document.

`SuggestionController` decides when to ask (a debounce after typing), builds the prompt
(a bounded window of the text before the cursor whose start only moves in large steps,
so the engine's KV prefix reuse evaluates just the newly typed tokens), runs the request
on the engine worker thread, and applies accept/dismiss. `GhostProcessor` draws the
first suggestion line inside the cursor's line; `GhostBufferControl` adds the further
lines as virtual lines below it (prompt-toolkit's AppendAutoSuggestion only draws at the
end of the buffer).

The first suggestion must not wait for the whole window (~900 tokens, seconds of prefill
on one thread), so the controller keeps the window ready ahead of the user:
- on open, the window at the end of the document (where writing usually goes on) is
  loaded from the document's saved KV state (kvcache.py), else a short window (the last
  ~400 characters) is evaluated at once and the full one in the background;
- a suggestion uses the full window when the cache holds it, else the short one;
- while the worker idles (engine `prefill` into the second KV sequence, given up at the
  next keystroke and resumed later) it evaluates the full window at the cursor, and the
  window that follows the next step once the cursor nears it; after a jump in normal
  mode the short window there comes first.

Once a suggestion has streamed, its alternatives are decoded in one batch by a job of their
own (editor/alternatives.py), cancelled by typing like the suggestion; the best of them
replaces what shows unless part of it was accepted already, and Alt-] / Alt-[ cycle.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace

from prompt_toolkit.layout.controls import BufferControl, UIContent
from prompt_toolkit.layout.processors import Processor, Transformation, TransformationInput
from prompt_toolkit.mouse_events import MouseEvent

from morph import tasks
from morph.editor import alternatives, kvcache

GHOST_STYLE = "class:ghost"
WINDOW_CHARS = 4000  # prompt window before the cursor (~900 tokens of English)
WINDOW_STEP = 1000  # the window start moves in steps of this many characters
SHORT_CHARS = 400  # the window used while the full one is not cached (~90 tokens, ~0.6 s)
SHORT_STEP = 100
NEXT_MARGIN = 400  # this close to a step, the next window is prefilled while idle
READY_SLACK = 16  # tokens: the full window unless it needs this many more than the short one
TYPED_MS = 80  # this long after a keystroke, what was typed is evaluated (the pause comes later)
POST_INTERVAL_S = 0.05  # 20 redraws/s while streaming: smooth, and fewer for a key to wait behind
_WORD = re.compile(r"\s*[^\s]+")


def window_start(before: str, max_chars: int = WINDOW_CHARS, step: int = WINDOW_STEP, ahead: int = 0) -> int:
    """Where the prompt window before the cursor starts: at a clean boundary that is stable
    while typing.

    The raw start (len - max_chars) is rounded up to a multiple of `step`, then moved to the
    next paragraph, line or word start within that step. Typing at the end therefore keeps
    the same start (and the same tokens) for `step` characters. `ahead`: the start once that
    many more characters are typed (the next window's, when it differs).
    """
    n = len(before)
    if n + ahead <= max_chars:
        return 0
    lo = min(n, ((n + ahead - max_chars) // step + 1) * step)
    for sep in ("\n\n", "\n", " "):
        j = before.find(sep, lo, min(n, lo + step))
        if j >= 0:
            return j + len(sep)
    return lo


def prompt_window(before: str, max_chars: int = WINDOW_CHARS, step: int = WINDOW_STEP) -> str:
    """The last <= max_chars of `before`, from `window_start`."""
    return before[window_start(before, max_chars, step):]


def next_word(text: str) -> str:
    m = _WORD.match(text)
    return m.group(0) if m else text


def next_line(text: str) -> str:
    """Up to and including the next newline (all of it if there is none)."""
    i = text.find("\n")
    return text if i < 0 else text[: i + 1]


@dataclass(eq=False)
class Suggestion:
    anchor_text: str  # buffer text the suggestion belongs to
    anchor_cursor: int
    strip: int  # leading whitespace still to drop (the prompt lost trailing blanks)
    features: dict
    t_request: float
    text: str = ""  # what is shown (not yet accepted)
    full: str = ""  # everything received
    accepted: str = ""  # taken into the document so far
    t_first: float | None = None
    done: bool = False
    timings: object | None = None
    job: object | None = None
    logged: bool = False
    extra: dict = field(default_factory=dict)
    request: object | None = None  # the request that streamed it (the full or the short window)
    ids: list = field(default_factory=list)  # its token ids as the engine sampled them
    strip0: int = 0  # `strip` as it was at the start (alternatives lose as many blanks)
    alts: list = field(default_factory=list)  # alternatives.Alternative, best first, once ready
    index: int = 0  # which of `alts` shows

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_request


class SuggestionController:
    def __init__(self, editor):
        self.ed = editor
        self.current: Suggestion | None = None
        self._timer = None
        self._typed_timer = None
        self._applying = False  # our own edits do not count as typing
        self.last_ttft_s: float | None = None
        self.last_tok_per_s: float | None = None
        self._warmed: str | None = None  # short window last prefilled after a cursor rest
        self._prefetch_key: tuple | None = None  # what the idle job prefills now

    # --- state -------------------------------------------------------------------

    def shown(self) -> bool:
        """A suggestion with text that still belongs to the buffer and cursor as they are."""
        s = self.current
        if s is None or not s.text:
            return False
        b = self.ed.buffer
        return b.cursor_position == s.anchor_cursor and b.text == s.anchor_text

    def visible(self) -> bool:
        return self.shown() and self.ed.insert_mode()

    @property
    def text(self) -> str:
        return self.current.text if self.current else ""

    # --- triggers (UI thread) -------------------------------------------------------

    def on_change(self, _=None) -> None:
        """Buffer text or cursor moved: drop the suggestion, ask again after a pause."""
        if self._applying:
            return
        self.drop("cancelled")
        self.schedule()
        self._schedule_typed()

    def schedule(self, delay_ms: int | None = None) -> None:
        self.cancel_timer()
        if self.ed.engine is None:
            return
        loop = self.ed.loop
        if loop is None:
            return
        delay = (self.ed.config.debounce_ms if delay_ms is None else delay_ms) / 1000.0
        self._timer = loop.call_later(delay, self._settled)

    def cancel_timer(self) -> None:
        for t in (self._timer, self._typed_timer):
            if t is not None:
                t.cancel()
        self._timer = self._typed_timer = None

    def _schedule_typed(self) -> None:
        ed = self.ed
        if ed.loop is None or not hasattr(ed.engine, "prefill"):
            return
        if self._typed_timer is not None:
            self._typed_timer.cancel()
        delay = min(TYPED_MS, ed.config.debounce_ms / 3)  # well before the suggestion's debounce
        self._typed_timer = ed.loop.call_later(delay / 1000.0, self._typed)

    def _typed(self) -> None:
        """Evaluate the window up to the cursor now, while the user may still be typing, so
        that the suggestion after the pause has nothing left to evaluate: the engine samples
        from the logits this prefill leaves (LlamaEngine._logits_after)."""
        self._typed_timer = None
        ed = self.ed
        if self.current is not None or ed.busy_with_popup() or not (ed.insert_mode() and self._can_suggest_here()):
            return  # a suggestion on its way is never cancelled for this
        _, _, full_req, short_req = self._requests(ed.buffer.document.text_before_cursor)

        def run(job):
            req = self._pick(full_req, short_req)
            req.cancel = job.cancel
            ed.engine.prefill(req)

        ed.worker.submit("typed", run)

    def _settled(self) -> None:
        self._timer = None
        if self.ed.busy_with_popup():
            return
        if self.ed.insert_mode() and self._can_suggest_here():
            self.start()
        else:
            self.warm()

    def _can_suggest_here(self) -> bool:
        doc = self.ed.buffer.document
        if not doc.text_before_cursor.strip():
            return False
        nxt = doc.current_char
        return not (nxt and (nxt.isalnum() or nxt == "_"))  # not inside a word

    @staticmethod
    def _window(before: str, max_chars: int = WINDOW_CHARS, step: int = WINDOW_STEP,
                ahead: int = 0) -> tuple[str, int]:
        """(prompt, blanks cut from its end) for the text `before` the cursor."""
        window = before[window_start(before, max_chars, step, ahead):]
        # BPE tokens carry their leading space: end the prompt before trailing blanks and
        # drop as much leading whitespace from the suggestion.
        stripped = window.rstrip(" \t")
        return stripped, len(window) - len(stripped)

    def _two_slots(self) -> bool:
        """The engine keeps a second prompt cached (LlamaEngine(slots=2)): only then can a
        short window serve while the full one is prefilled beside it."""
        return getattr(self.ed.engine, "slots", 1) >= 2

    def _short(self, before: str) -> str:
        """The short window's prompt ("" without a second slot). Same end as the full
        window, so the same blanks are cut."""
        return self._window(before, SHORT_CHARS, SHORT_STEP)[0] if self._two_slots() else ""

    def _request(self, prompt: str, **kw):
        ed = self.ed
        return tasks.build_request("ghost", prompt, defaults=ed.defaults, steering=ed.steering, **kw)

    def _requests(self, before: str):
        """(prompt, blanks cut, its request, the short window's request or None) at `before`."""
        prompt, strip = self._window(before)
        short = self._short(before)
        short_req = self._request(short) if short and short != prompt else None
        return prompt, strip, self._request(prompt), short_req

    def _missing(self, req) -> int:
        """Prompt tokens of `req` the cache lacks (worker thread; all if the engine cannot tell)."""
        reusable = getattr(self.ed.engine, "reusable", None)
        if reusable is None:
            return 1 << 30  # cannot tell: assume all
        n, cached = reusable(req)
        return n - cached

    # --- requests ------------------------------------------------------------------

    def start(self) -> None:
        """Ask the engine to continue the text before the cursor (UI thread)."""
        ed = self.ed
        before = ed.buffer.document.text_before_cursor
        prompt, strip, full_req, short_req = self._requests(before)
        if not prompt:
            return
        s = Suggestion(
            anchor_text=ed.buffer.text,
            anchor_cursor=ed.buffer.cursor_position,
            strip=strip,
            strip0=strip,
            features=dict(ed.profile),
            t_request=time.perf_counter(),
        )
        self.current = s
        if self._typed_timer is not None:
            self._typed_timer.cancel()
            self._typed_timer = None
        ed.trace("request", chars=len(prompt), start=len(before) - len(prompt) - strip)
        post = ed.post

        def run(job):
            req = self._pick(full_req, short_req)
            s.request = req
            s.extra["window_chars"] = len(req.prompt)
            ed.trace("window", chars=len(req.prompt), short=req is short_req)
            # The first piece goes to the screen at once; later ones are batched so the UI
            # redraws at most every POST_INTERVAL_S instead of once per token.
            req.cancel = job.cancel
            pending: list[str] = []
            last = 0.0
            visible = False  # until text that is not blank went out, send every piece
            for ev in ed.engine.stream(req):
                s.ids.extend(ev.token_ids)
                if ev.text:
                    pending.append(ev.text)
                    now = time.perf_counter()
                    if not visible or now - last >= POST_INTERVAL_S:
                        post(self._on_piece, s, "".join(pending))
                        visible = visible or any(p.strip() for p in pending)
                        pending.clear()
                        last = now
                if ev.done:
                    if pending:
                        post(self._on_piece, s, "".join(pending))
                    post(self._on_done, s, ev)

        s.job = ed.worker.submit("suggest", run)
        self._warmed = None
        self.prefetch(before)

    def _pick(self, full_req, short_req):
        """The full window once the cache holds it (nearly), else the short one if that is
        cheaper now (worker thread); the idle prefetch completes the full one meanwhile."""
        if short_req is None:
            return full_req
        missing = self._missing(full_req)
        if missing > READY_SLACK and self._missing(short_req) + READY_SLACK < missing:
            return short_req
        return full_req

    def _prefill(self, req, job) -> bool:
        """Evaluate `req`'s prompt unless the cache (nearly) holds it (worker thread). A
        prefill never cuts a cached prompt back, so a window that is already there (the cursor
        rests just before where the user typed) is left alone."""
        if self._missing(req) <= READY_SLACK:
            return True
        req.cancel = job.cancel
        prefill = getattr(self.ed.engine, "prefill", None)
        if prefill is not None:
            return prefill(req)
        for _ev in self.ed.engine.stream(req):  # an engine without prefill: a 0-token stream
            pass
        return not job.cancelled

    def warm(self) -> None:
        """The cursor rests outside insert mode (a jump): make the short window there ready
        now and the full one in the background (no tokens generated). An engine without
        `prefill` gets the full window as a 0-token stream."""
        ed = self.ed
        if ed.engine is None:
            return
        before = ed.buffer.document.text_before_cursor
        can = hasattr(ed.engine, "prefill")
        prompt = self._short(before) or self._window(before)[0]
        if prompt and prompt != self._warmed:
            self._warmed = prompt
            # The same framing as the suggestion (its steering placement decides the prompt's KV).
            req = self._request(prompt, max_tokens=ed.defaults.suggestion_tokens if can else 0)
            ed.worker.submit("warm", lambda job: self._prefill(req, job))
        self.prefetch(before)

    def prefetch(self, before: str | None = None) -> None:
        """While the worker idles: the full window at the cursor (or for the text `before`),
        then, within NEXT_MARGIN characters of its next step, the window after that step."""
        ed = self.ed
        if ed.worker is None or not hasattr(ed.engine, "prefill"):
            return
        if before is None:
            before = ed.buffer.document.text_before_cursor
        full, _ = self._window(before)
        nxt = self._window(before, ahead=NEXT_MARGIN)[0] if self._two_slots() else ""
        prompts = [p for p in dict.fromkeys((full, nxt)) if p]
        key = (tuple(prompts), tuple(sorted(ed.profile.items())))
        if not prompts or key == self._prefetch_key:
            return
        self._prefetch_key = key
        reqs = [self._request(p, max_tokens=ed.defaults.suggestion_tokens) for p in prompts]

        def run(job):
            t = time.perf_counter()
            for req in reqs:
                if not self._prefill(req, job):
                    return
            ed.trace("prefetched", chars=[len(r.prompt) for r in reqs], ms=round((time.perf_counter() - t) * 1000, 1))

        ed.worker.submit_idle("prefill", run)

    def invalidate_warm(self) -> None:
        """The steering changed: windows prepared under the old vector no longer count."""
        self._warmed = None
        self._prefetch_key = None
        self.prefetch()

    # --- open and close (saved KV state) -----------------------------------------------

    def on_open(self) -> None:
        """Right after the document opens: prepare the window at its end (UI thread)."""
        ed = self.ed
        if ed.worker is None or not hasattr(ed.engine, "prefill"):
            return
        text = ed.buffer.text
        full, _ = self._window(text)
        if not full:
            return
        short = self._short(text) or full  # one slot: the full window at once
        n_gen = ed.defaults.suggestion_tokens
        full_req = self._request(full, max_tokens=n_gen)
        short_req = self._request(short, max_tokens=n_gen)
        self._warmed = short
        store = ed.kv_store_bytes() > 0 and hasattr(ed.engine, "import_state")

        def run(job):
            t = time.perf_counter()
            n = 0
            if store:
                try:
                    n = kvcache.restore(ed.engine, full_req, ed.path)
                except Exception as e:  # a cache: never in the way of editing
                    ed.trace("restore_error", error=repr(e))
            ed.trace("restore", tokens=n, ms=round((time.perf_counter() - t) * 1000, 1))
            if self._missing(full_req) > READY_SLACK:
                self._prefill(short_req, job)
                ed.trace("prefilled", chars=len(short), ms=round((time.perf_counter() - t) * 1000, 1))

        ed.worker.submit("open", run)
        self.prefetch(text)

    def save_state(self) -> None:
        """On close, after the worker stopped: keep the KV state of the window at the end of
        the document as it is on disk (what the next open reads), as far as the cache holds
        it (text typed after it and left unsaved does not spoil the prefix before it)."""
        ed = self.ed
        if ed.engine is None or not hasattr(ed.engine, "export_state"):
            return
        limit = ed.kv_store_bytes()
        if limit <= 0:
            return
        full, _ = self._window(ed.ebuf.saved_text)
        if full:
            t = time.perf_counter()
            n = kvcache.save(ed.engine, self._request(full), ed.path, limit)
            ed.trace("saved_state", tokens=n, ms=round((time.perf_counter() - t) * 1000, 1))

    # --- results (UI thread, via call_soon_threadsafe) ---------------------------------

    def _on_piece(self, s: Suggestion, piece: str) -> None:
        if s is not self.current:
            return
        s.full += piece
        if s.strip:
            lead = len(piece) - len(piece.lstrip(" \t"))
            cut = min(lead, s.strip)
            piece = piece[cut:]
            s.strip = 0 if piece else s.strip - cut
        if not piece:
            return
        if s.t_first is None and not s.text and piece.strip():
            s.t_first = time.perf_counter()
            self.last_ttft_s = s.ttft_s
            self.ed.trace("first", ttft_ms=round(s.ttft_s * 1000, 2))
        s.text += piece
        self.ed.invalidate()

    def _on_done(self, s: Suggestion, ev) -> None:
        if s is not self.current:
            return
        s.done = True
        s.timings = ev.timings
        if ev.timings is not None and ev.timings.gen_tokens > 1:
            self.last_tok_per_s = ev.timings.tok_per_s
        self.ed.trace(
            "done", finish=ev.finish_reason, **(ev.timings.as_dict() if ev.timings else {})
        )
        self.ed.invalidate()
        if ev.finish_reason != "cancelled":
            self._ask_alternatives(s)

    # --- alternatives ----------------------------------------------------------------

    def _ask_alternatives(self, s: Suggestion) -> None:
        """Decode `[editor] alternatives` more continuations of `s`'s prompt in one batch and
        score `s` with them (a worker job; typing cancels it like a suggestion)."""
        ed = self.ed
        n = min(ed.config.alternatives, getattr(ed.engine, "alt_seqs", 0) - 1)
        if n <= 0 or s.request is None or not s.ids or not (s.accepted + s.text).strip():
            return
        req = replace(s.request, temperature=alternatives.TEMPERATURE, cancel=None)
        seeds = [alternatives.SEED + i for i in range(n)]
        post = ed.post

        def run(job):
            t = time.perf_counter()
            out = ed.engine.alternatives(req, seeds, cancel=job.cancel, known=[list(s.ids)])
            if not job.cancelled and out:
                post(self._on_alternatives, s, req.prompt, out, seeds, (time.perf_counter() - t) * 1000)

        ed.worker.submit("alternatives", run)

    def _on_alternatives(self, s: Suggestion, before: str, out: list, seeds: list, ms: float) -> None:
        if s is not self.current:
            return
        shown = s.accepted + s.text
        first = alternatives.Alternative(shown, alternatives.score(before, shown, out[0].logprobs), streamed=True)
        alts, texts = [first], {shown.strip()}
        for a, seed in zip(out[1:], seeds):
            text = alternatives.cut_blanks(a.text, s.strip0)
            if a.finish != "cancelled" and text.strip() and text.strip() not in texts:
                texts.add(text.strip())
                alts.append(alternatives.Alternative(text, alternatives.score(before, a.text, a.logprobs), seed=seed))
        s.alts = alternatives.rank(alts)
        s.index = s.alts.index(first)
        if not s.accepted and s.alts[0] is not first:  # the best shows, unless part was taken already
            self._show(s, 0)
        self.ed.trace("alternatives", ms=round(ms, 1), n=len(s.alts), shown=s.index,
                      fluency=[round(a.scores.fluency, 3) for a in s.alts])
        self.ed.invalidate()

    def _show(self, s: Suggestion, i: int) -> None:
        s.index = i
        s.text = s.alts[i].text[len(s.accepted):]

    def cycle(self, step: int) -> bool:
        """Alt-] (+1) / Alt-[ (-1): show the next or previous alternative (of those that
        go on from what was accepted of the suggestion so far)."""
        s = self.current
        if not self.visible() or not s.alts:
            return False
        ok = [i for i, a in enumerate(s.alts) if a.text.startswith(s.accepted) and len(a.text) > len(s.accepted)]
        if not ok or ok == [s.index]:
            return False
        pos = ok.index(s.index) if s.index in ok else (-1 if step > 0 else 0)
        self._show(s, ok[(pos + step) % len(ok)])
        self.ed.trace("cycle", shown=s.index)
        self.ed.invalidate()
        return True

    def position(self) -> tuple[int, int] | None:
        """(1-based index, count) of the alternative that shows, once they are ready."""
        s = self.current
        return (s.index + 1, len(s.alts)) if s is not None and s.alts else None

    def scores_line(self) -> str:
        """The F2 panel's line for the suggestion that shows ("" without alternatives)."""
        s = self.current
        if s is None or not s.alts:
            return ""
        a = s.alts[s.index]
        where = "the first" if a.streamed else f"seed {a.seed}"
        return f"suggestion {s.index + 1}/{len(s.alts)} ({where}): {a.scores.describe()}"

    # --- accept / dismiss (UI thread) --------------------------------------------------

    def accept(self, how: str = "all") -> bool:
        """Insert all of the suggestion, its next word, or its next line."""
        if not self.visible():
            return False
        s = self.current
        assert s is not None
        part = {"all": lambda t: t, "word": next_word, "line": next_line}[how](s.text)
        self._applying = True
        try:
            self.ed.buffer.save_to_undo_stack()  # one undo step per acceptance
            self.ed.buffer.insert_text(part)
        finally:
            self._applying = False
        s.accepted += part
        s.extra["how"] = how
        s.text = s.text[len(part):]
        s.anchor_text = self.ed.buffer.text
        s.anchor_cursor = self.ed.buffer.cursor_position
        if not s.text and (s.done or how == "all"):
            self._log(s, "accepted" if how == "all" else how)
            self.current = None
            self.ed.worker.cancel(("suggest", "alternatives"))
            self.schedule()
        self.ed.invalidate()
        return True

    def dismiss(self) -> bool:
        """Esc / Ctrl-]: hide the suggestion and stop generating it."""
        had = self.shown()
        self.cancel_timer()
        self.drop("dismissed" if had else "cancelled")
        return had

    def drop(self, action: str) -> None:
        s = self.current
        if s is None:
            return
        self.current = None
        self.ed.worker.cancel(("suggest", "alternatives"))
        if s.accepted:  # partly taken (word/line), the rest typed over or dismissed
            self._log(s, s.extra.get("how", "word"))
        elif s.text:
            self._log(s, action)
        self.ed.invalidate()

    def _log(self, s: Suggestion, action: str) -> None:
        if s.logged:
            return
        s.logged = True
        tps = s.timings.tok_per_s if s.timings is not None else None
        chosen = None
        if s.alts:  # which alternative showed (the history's `chosen`)
            a = s.alts[s.index]
            chosen = {"alternative": s.index + 1, "of": len(s.alts), "streamed": a.streamed, "seed": a.seed,
                      **a.scores.as_dict()}
        self.ed.log_suggestion(action, s.accepted + s.text, s.accepted or None, s.features, s.ttft_s, tps, chosen)


def _split_fragments(fragments, x: int):
    """Split a fragment list at character position x."""
    before, after = [], []
    pos = 0
    for frag in fragments:
        style, text = frag[0], frag[1]
        if pos >= x:
            after.append(frag)
        elif pos + len(text) <= x:
            before.append(frag)
        else:
            k = x - pos
            before.append((style, text[:k]))
            after.append((style, text[k:]))
        pos += len(text)
    return before, after


class GhostProcessor(Processor):
    """Draws the suggestion's first line at the cursor, inside the line (not only at the end)."""

    def __init__(self, controller: SuggestionController):
        self.ctl = controller
        self.tail: list = []  # what followed the cursor, for GhostBufferControl's last virtual line

    def apply_transformation(self, ti: TransformationInput) -> Transformation:
        doc = ti.document
        if ti.lineno != doc.cursor_position_row or not self.ctl.visible():
            return Transformation(ti.fragments)
        lines = self.ctl.text.split("\n")
        first = lines[0]
        cx = ti.source_to_display(doc.cursor_position_col)
        before, after = _split_fragments(ti.fragments, cx)
        n = len(first)
        if len(lines) == 1:
            frags = before + [(GHOST_STYLE, first)] + after
            self.tail = []
        else:
            frags = before + [(GHOST_STYLE, first)]
            self.tail = after

        def s2d(i: int) -> int:
            return i if i <= cx else i + n

        def d2s(i: int) -> int:
            return i if i <= cx else max(cx, i - n)

        return Transformation(frags, source_to_display=s2d, display_to_source=d2s)


class GhostBufferControl(BufferControl):
    """A BufferControl that shows a multi-line suggestion as virtual lines under the cursor."""

    def __init__(self, *a, ghost: GhostProcessor, **kw):
        super().__init__(*a, **kw)
        self.ghost = ghost
        self._extra = (0, 0)  # (cursor row, virtual lines) of the last render

    def create_content(self, width: int, height: int, preview_search: bool = False) -> UIContent:
        content = super().create_content(width, height, preview_search)
        if content.menu_position is None:
            # Popups attached to this window (the explain float) need the cursor even
            # while they have the focus; prompt-toolkit records it only for the focused one.
            content.menu_position = content.cursor_position
        ctl = self.ghost.ctl
        self._extra = (0, 0)
        if not ctl.visible() or "\n" not in ctl.text:
            return content
        lines = ctl.text.split("\n")
        k = len(lines) - 1
        row = self.buffer.document.cursor_position_row
        self._extra = (row, k)
        ghost = self.ghost

        def get_line(i: int):
            if i <= row:
                return content.get_line(i)
            if i < row + k:
                return [(GHOST_STYLE, lines[i - row]), ("", " ")]
            if i == row + k:
                content.get_line(row)  # makes the processor compute the tail
                return [(GHOST_STYLE, lines[-1])] + list(ghost.tail) + [("", " ")]
            return content.get_line(i - k)

        out = UIContent(
            get_line=get_line,
            line_count=content.line_count + k,
            cursor_position=content.cursor_position,
            menu_position=content.menu_position,
        )
        return out

    def mouse_handler(self, mouse_event: MouseEvent):
        row, k = self._extra
        y = mouse_event.position.y
        if k and y > row:
            y = row if y <= row + k else y - k
            mouse_event = MouseEvent(
                position=mouse_event.position._replace(y=y),
                event_type=mouse_event.event_type,
                button=mouse_event.button,
                modifiers=mouse_event.modifiers,
            )
        return super().mouse_handler(mouse_event)
