"""The REPL loop: a prompt-toolkit PromptSession, streamed replies, slash commands.

Generation runs in a worker thread and the main thread prints its events, so Ctrl-C
(SIGINT, delivered to the main thread while no prompt is active) only sets the request's
cancel Event: the engine stops at the next token, the partial reply is kept and marked
cancelled, and the loop returns to the prompt with the session intact.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from typing import Callable, TextIO

try:
    import termios
except ImportError:  # not POSIX: keys typed during a reply are echoed, nothing worse
    termios = None

from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.cursor_shapes import ModalCursorShapeConfig
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import has_focus, is_searching
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.styles import Style

from morph import choose, models, paths
from morph.engine.base import Event
from morph.errors import MorphError
from morph.repl import commands
from morph.repl.log import SessionLog, load_session
from morph.repl.session import Session

STYLE = Style.from_dict({"features": "ansicyan", "mode": "ansiyellow", "prompt": "bold"})


def _bindings() -> KeyBindings:
    kb = KeyBindings()
    editing = has_focus(DEFAULT_BUFFER) & ~is_searching

    @kb.add("enter", filter=editing)
    def _submit(event):
        buf = event.current_buffer
        cs = buf.complete_state
        if cs is not None and cs.current_completion is not None:
            buf.apply_completion(cs.current_completion)  # Enter picks a highlighted completion
            return
        buf.validate_and_handle()

    @kb.add("escape", "enter", filter=editing)
    def _newline(event):
        event.current_buffer.insert_text("\n")

    return kb


class Repl:
    def __init__(
        self,
        rt,
        *,
        keys: str = "vi",
        mode: str = "chat",
        features: dict[str, float | None] | None = None,
        max_tokens: int = 256,
        sampling: dict | None = None,
        experimental: bool = False,
        log: bool = True,
        verbose: int = 0,
        input=None,
        output=None,
        out: TextIO | None = None,
        history: History | None = None,
        open_runtime: Callable[[str], object] | None = None,
    ):
        self.rt = rt
        self.out = out or sys.stdout
        self.verbose = verbose
        self.open_runtime = open_runtime
        self.session = Session(
            rt.engine, rt.catalog, rt.model_name, max_tokens=max_tokens, defaults=rt.defaults,
            sampling={k: v for k, v in (sampling or {}).items() if v is not None},
            experimental=experimental, log=SessionLog(log, rt.model_name),
        )
        self.session.set_mode(mode)
        self.session.features.load(features or {})
        self._bannered = False
        self._status = False  # a transient status line is on screen (a tty only)
        self._real_tty = input is None and sys.stdin.isatty()
        self.on_piece: list[Callable[[str], None]] = []  # called with each streamed piece
        if history is None:
            try:
                history = FileHistory(str(paths.history_file("repl")))
            except OSError:
                history = InMemoryHistory()
        self.prompt_session = PromptSession(
            multiline=True,
            prompt_continuation=lambda width, line, wrap: "." * (width - 1) + " ",
            history=history,
            auto_suggest=AutoSuggestFromHistory(),
            vi_mode=(keys == "vi"),
            cursor=ModalCursorShapeConfig(),
            completer=commands.SlashCompleter(self),
            complete_while_typing=True,
            key_bindings=_bindings(),
            style=STYLE,
            input=input,
            output=output,
        )
        # Esc waits this long for a following Enter (Esc Enter = newline) before it acts alone.
        self.prompt_session.app.timeoutlen = 0.5

    # --- output -----------------------------------------------------------------------

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def say(self, line: str) -> None:
        self.write(line + "\n")

    def say_lines(self, lines: list[str]) -> None:
        self.write("".join(line + "\n" for line in lines))

    def note(self, line: str) -> None:
        dim = getattr(self.out, "isatty", lambda: False)()
        self.say(f"\x1b[2m({line})\x1b[0m" if dim else f"({line})")

    def error(self, line: str) -> None:
        self.say(f"error: {line}")

    def _message(self):
        s = self.session
        feats = s.features.label()
        parts = []
        if feats:
            parts.append(("class:features", f"[{feats}] "))
        if s.mode != "chat":
            parts.append(("class:mode", s.mode))
        parts.append(("class:prompt", "> "))
        return parts

    # --- the loop ---------------------------------------------------------------------

    def banner(self) -> None:
        if self._bannered:
            return
        self._bannered = True
        self.note(f"morph repl: {self.session.model_name}, {self.session.mode} mode. "
                  "Enter sends, Alt-Enter adds a line, /help lists commands, Ctrl-D quits")

    def run(self) -> int:
        self.banner()
        while True:
            try:
                text = self.prompt_session.prompt(self._message)
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line, as in Python's REPL
            except EOFError:
                break
            try:
                self.handle(text)
            except EOFError:
                break
            except KeyboardInterrupt:
                self.note("interrupted")
            except MorphError as e:
                self.error(str(e))
        return 0

    def handle(self, text: str) -> None:
        if not text.strip():
            return
        if text.startswith("//"):
            self.answer(text[1:])
        elif text.startswith("/"):
            commands.dispatch(self, text.strip())
        else:
            self.answer(text)

    def answer(self, text: str) -> str | None:
        """Stream the reply to `text` (a rewrite chosen from a ladder: printed once chosen);
        returns the finish reason."""
        s = self.session
        prep = s.prepare(text)
        if prep.dropped:
            self.note(f"dropped the {prep.dropped} oldest exchange{'s' if prep.dropped > 1 else ''} "
                      f"to fit the {s.engine.n_ctx}-token context")
        cancel = threading.Event()
        prep.request.cancel = cancel
        q: queue.Queue = queue.Queue(maxsize=1)  # keeps the worker at most a token ahead
        ladder = self._ladder()
        chosen: list[choose.Choice] = []
        if ladder is not None:
            self._show_status(f"choosing among {len(choose.rungs_for('rewrite'))} candidates…")
            events = self._choose(ladder, text, prep.request.max_tokens, cancel, chosen)
        else:
            events = s.engine.stream(prep.request)

        def work():
            try:
                for ev in events:
                    q.put(ev)
            except BaseException as e:  # re-raised in the main thread
                q.put(e)

        worker = threading.Thread(target=work, name="morph-repl-stream", daemon=True)
        parts: list[str] = []
        finish, timings, failure = None, None, None
        with self._no_echo():
            worker.start()
            finish, timings, failure = self._drain(q, worker, cancel, parts)
            self._clear_status()
        worker.join(timeout=5)
        reply = "".join(parts)
        if reply and not reply.endswith("\n"):
            self.write("\n")
        if failure is not None:
            if isinstance(failure, MorphError):
                raise failure
            raise MorphError(f"generation failed: {failure}") from failure
        if finish is None:
            finish = "cancelled" if cancel.is_set() else "stop"
        if finish == "cancelled":
            self.note("cancelled")
        if self.verbose and timings is not None:
            self.note(f"{timings.gen_tokens} tokens, TTFT {timings.ttft_s * 1000:.0f} ms, "
                      f"{timings.tok_per_s:.1f} tok/s, {timings.evaluated_tokens}/{timings.prompt_tokens} "
                      f"prompt tokens evaluated, finish {finish}")
        if self.verbose and chosen:
            self.note(choose.describe(chosen[0]))
        s.commit(text, reply, finish, timings.as_dict() if timings else None, prep.dropped,
                 chosen=chosen[0].as_dict() if chosen else None)
        return finish

    def _ladder(self) -> choose.Ladder | None:
        """A rewrite at the features' default strengths is chosen from a ladder (/choose)."""
        s = self.session
        if not (s.choose and s.mode == "rewrite") or s.sampling.get("apply"):  # --apply: as given, once
            return None
        return choose.ladder_for(s.catalog, s.features.steering(), lambda: self.rt.embedder, self._no_ladder,
                                 engine=s.engine)

    def _no_ladder(self, why: str) -> None:
        self.session.choose = False
        self.note(f"{why}; rewriting once at the default strengths from now on (/choose on tries again)")

    def _choose(self, ladder: choose.Ladder, text: str, max_tokens: int, cancel: threading.Event,
                chosen: list):
        """The ladder's choice as the one event of a stream (on the worker thread)."""
        s = self.session
        try:
            choice = choose.run(s.engine, ladder.embedder, "rewrite", text, ladder.features, defaults=s.defaults,
                                cancel=cancel, **(s.sampling | {"max_tokens": max_tokens}))
        except KeyboardInterrupt:  # cancelled (Ctrl-C): nothing was chosen
            yield Event(done=True, finish_reason="cancelled")
            return
        chosen.append(choice)
        yield Event(text=choice.text, done=True, finish_reason=choice.chosen.finish, timings=choice.timings)

    def _show_status(self, line: str) -> None:
        """A dim line on a terminal while nothing else shows progress, erased before the reply."""
        if getattr(self.out, "isatty", lambda: False)():
            self.write(f"\x1b[2m{line}\x1b[0m")
            self._status = True

    def _clear_status(self) -> None:
        if self._status:
            self._status = False
            self.write("\r\x1b[2K")

    def _drain(self, q, worker, cancel, parts):
        """Print the worker's events until the final one; Ctrl-C sets `cancel`."""
        finish, timings, failure = None, None, None
        while True:
            try:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    if not worker.is_alive() and q.empty():
                        break
                    continue
                if isinstance(item, BaseException):
                    failure = item
                    break
                if item.text:
                    self._clear_status()
                    parts.append(item.text)
                    self.write(item.text)
                    for cb in self.on_piece:
                        cb(item.text)
                if item.done:
                    finish, timings = item.finish_reason, item.timings
                    break
            except KeyboardInterrupt:
                cancel.set()  # the worker stops at the next token and sends a final event
        return finish, timings, failure

    @contextlib.contextmanager
    def _no_echo(self):
        """Keys typed during a reply are not echoed into it (they still reach the next prompt)."""
        fd, old = None, None
        if self._real_tty and termios is not None:
            try:
                fd = sys.stdin.fileno()
                old = termios.tcgetattr(fd)
                new = list(old)
                new[3] &= ~termios.ECHO
                termios.tcsetattr(fd, termios.TCSANOW, new)
            except (OSError, ValueError, termios.error):
                old = None
        try:
            yield
        finally:
            if old is not None:
                termios.tcsetattr(fd, termios.TCSANOW, old)

    # --- resume and model switch --------------------------------------------------------

    def resume(self, session_id: int | None) -> None:
        info, turns = load_session(session_id)
        self.banner()
        for w in self.session.restore(info, turns):
            self.note(w)
        n, ctx = sum(1 for t in turns if t.role == "user"), len(self.session.context) // 2
        self.note(f"resumed session #{info.id}: {n} input{'s' if n != 1 else ''}, "
                  f"{ctx} exchange{'s' if ctx != 1 else ''} in context, mode {self.session.mode}")
        if info.model and info.model != self.session.model_name:
            self.note(f"that session used {info.model}; this one uses {self.session.model_name}")
        for t in [t for t in self.session.transcript if t.role in ("user", "assistant")][-2:]:
            if t.role == "user":
                self.say("> " + t.content.strip().replace("\n", "\n  "))
            elif t.content.strip():
                self.say(t.content.strip())
            if t.finish_reason == "cancelled":
                self.note("cancelled")

    def switch_model(self, spec: str) -> None:
        models.resolve(spec)  # unknown names fail here, before anything is unloaded
        if self.open_runtime is None:
            raise MorphError("switching models is not available here")
        new = self.open_runtime(spec)
        old, s = self.rt, self.session
        self.rt = new
        s.log.model = new.model_name
        for problem in s.rebind(new.engine, new.catalog, new.model_name):
            self.note(f"dropped {problem}")
        if s.mode != "continue" and not new.info.has_chat_template:
            s.mode = "continue"
            self.note("this model has no chat template: mode is now continue")
        old.close()
        self.say(f"model: {new.model_name}")
