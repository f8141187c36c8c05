"""Editor: the application state of `morph write FILE`.

Holds the file buffer, the steering profile, the suggestion controller, the engine worker
thread, the background writer (history rows, recovery file) and the prompt-toolkit
Application. Key bindings, layout, ex commands, the feature panel and the seed UX live in
their own modules and call back into this object.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.cursor_shapes import ModalCursorShapeConfig
from prompt_toolkit.enums import EditingMode
from prompt_toolkit.key_binding.vi_state import InputMode

from morph import tasks
from morph.config import Config
from morph.editor import history, recovery
from morph.editor.buffer import EditorBuffer
from morph.editor.ghost import SuggestionController
from morph.editor.history import Background
from morph.editor.worker import EngineWorker
from morph.errors import MorphError
from morph.fsutil import user_path
from morph.steering.profile import Profile

GC_TICK_S = 1.0
GC_IDLE_S = 0.8  # no key for this long: a collection cannot delay one
GC_EVERY_S = 10.0
MIRROR_DELAY_S = 1.0  # recovery file written this long after a change (issue: within 2 s)


@dataclass
class Confirm:
    """A one-key question in the message line: {key: action}; other keys cancel."""

    question: str
    choices: dict[str, Callable[[], None]]
    on_cancel: Callable[[], None] | None = None


class Editor:
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        engine=None,
        catalog=None,
        config: Config | None = None,
        model_name: str = "",
        keys: str | None = None,
        profile: list[str] | dict[str, float | None] | None = None,
        experimental: bool = False,
        log: bool = True,
        embedder: Callable[[], object] | None = None,
        loader: Callable[[], tuple] | None = None,
        input=None,
        output=None,
    ):
        self._trace_fh = _open_trace()
        self.trace("open")
        self.config = config or Config()
        self.ebuf = EditorBuffer(path)  # MorphError for files we must not edit
        self.buffer: Buffer = self.ebuf.buffer
        self.path: Path = self.ebuf.path
        self.engine = None
        self.catalog = None
        self.worker: EngineWorker | None = None
        self.features: Profile | None = None
        # loader (the CLI): opens (engine, catalog, model name) on a thread started after the
        # first paint, so a document shows at once; ghost text starts when it is attached.
        self._loader = loader
        self._load_thread = None
        self.model_name = "loading model…" if loader is not None else (model_name or "no model")
        self.keys = keys or self.config.editor_keys
        self.log_enabled = log
        # Opens (or returns) the meaning check's embedder, on the engine worker: telescope
        # commands choose among a ladder with it ([editor] choose). None: no ladder.
        self.open_embedder = embedder
        self.message: tuple[str, str] = ("", "")  # (style class, text)
        self.confirm: Confirm | None = None
        self.loop = None
        self._quit_armed = 0.0
        self._last_key = 0.0
        self._manage_gc = False
        self._last_gc = time.monotonic()
        self._mirror_handle = None
        self._resume_handle = None
        self._mirrored = False  # a recovery file of ours exists

        self.command_buffer = Buffer(name="command", multiline=False)
        self.bg = Background(on_error=lambda m: self.post(self.error, m))
        self.suggest = SuggestionController(self)
        self.defaults = tasks.defaults(self.config)
        self._experimental = experimental
        self._profile_override = profile
        if loader is None:
            self._attach(engine, catalog, model_name)
        self.recovered = self._check_recovery()

        from morph.editor.panel import FeaturePanel
        from morph.editor.seed import SeedUX

        from morph.editor.lexer import lexer_for

        self.lexer = lexer_for(self.path, deferred=True)
        self.panel = FeaturePanel(self)
        self.seed = SeedUX(self)
        self.app = self._create_app(input, output)
        self.buffer.on_text_changed += self._on_text_changed
        self.buffer.on_cursor_position_changed += self.suggest.on_change

    # --- construction ------------------------------------------------------------

    def _create_app(self, input, output) -> Application:
        from morph.editor.key_bindings import build_key_bindings
        from morph.editor.layout import build_layout
        from morph.editor.style import editor_style

        app = Application(
            layout=build_layout(self),
            key_bindings=build_key_bindings(self),
            style=editor_style(markdown=False),
            editing_mode=EditingMode.EMACS if self.keys == "emacs" else EditingMode.VI,
            full_screen=True,
            mouse_support=False,
            cursor=ModalCursorShapeConfig(),
            input=input,
            output=output,
        )
        app.ttimeoutlen = 0.05  # a lone Esc leaves insert mode without a noticeable wait
        app.timeoutlen = 0.5
        app.key_processor.after_key_press += self._after_key
        if self._trace_fh is not None:
            read_keys = app.input.read_keys

            def traced_read_keys():
                self.trace("input")
                return read_keys()

            app.input.read_keys = traced_read_keys
            app.before_render += lambda _: self.trace("render_start")
            app.after_render += lambda _: self.trace("render")
        app.after_render += self._after_first_render
        return app

    def _after_first_render(self, app) -> None:
        """The document is on screen: now the slower parts (highlighting, the model)."""
        app.after_render -= self._after_first_render
        from morph.editor.style import editor_style

        def highlighted():  # the lexer's thread: pygments is imported now
            style = editor_style()
            self.post(self._set_style, style)

        if hasattr(self.lexer, "load"):
            self.lexer.load(on_ready=highlighted)
        else:
            self._set_style(editor_style())
        self._start_loading()

    def _set_style(self, style) -> None:
        self.app.style = style
        self.invalidate()

    def _attach(self, engine, catalog, model_name: str = "") -> None:
        """The engine and the catalog: at construction, or once the loader has them (UI thread)."""
        self.engine, self.catalog = engine, catalog
        if engine is not None:
            self.model_name = model_name or engine.info.file.name
            self.worker = EngineWorker(engine, on_error=self._worker_error)
        if catalog is not None:
            info = engine.info if engine is not None else None
            self.features = Profile(catalog, info, experimental=self._experimental)
            self._init_profile(self._profile_override)  # -f that does not resolve: MorphError

    def _start_loading(self) -> None:
        """After the first paint: open the engine on a thread, attach it on the UI thread."""
        if self._loader is None or self._load_thread is not None:
            return
        loader = self._loader

        def run():
            try:
                got = loader()
            except BaseException as e:  # reported by the UI thread: the app exits with it
                self.post(self._load_failed, e)
                return
            self.post(self._loaded, *got)

        self._load_thread = threading.Thread(target=run, name="morph-load", daemon=True)
        self._load_thread.start()

    def _loaded(self, engine, catalog, model_name) -> None:
        try:
            self._attach(engine, catalog, model_name)
        except MorphError as e:  # `-f NAME` the catalog does not have: as before the editor opened
            self._load_failed(e)
            return
        self.trace("attached")
        self.suggest.on_open()
        self.suggest.on_change()  # typed while loading: a suggestion once the pause comes
        self.invalidate()

    def _load_failed(self, exc: BaseException) -> None:
        if self.app.is_running:
            self.app.exit(exception=exc)  # `morph write` prints it as one error line

    def wait_loaded(self) -> None:
        """Block until a loader started has finished (on quit: the engine is closed after)."""
        if self._load_thread is not None:
            self._load_thread.join()

    def _init_profile(self, override: list[str] | dict[str, float | None] | None) -> None:
        """-f on the command line (strict), else the document's stored profile, else the
        config's (both forgiving: what no longer resolves is reported and skipped)."""
        if self.features is None:
            return
        if override is not None:
            self.features.load(override)
            return
        stored = None
        if self.log_enabled:
            from morph import store

            with store.safe("steering profile") as box:
                if box:
                    stored = history.load_profile(box[0], self.path)
        dropped = self.features.load(dict(self.config.features) if stored is None else stored, strict=False)
        if dropped:
            self.message = ("message.error", f"features not available: {'; '.join(dropped)}")

    def _check_recovery(self):
        rec = recovery.read(self.path)
        if rec is None:
            return None
        if rec.text == self.buffer.text:
            recovery.remove(self.path)  # nothing was lost
            return None
        if rec.owner_alive:
            self.message = (
                "message.error",
                f"{self.ebuf.display_name} is open in another morph{f' (pid {rec.pid})' if rec.pid else ''}; "
                "its unsaved text is kept",
            )
            return None
        return rec

    # --- running -------------------------------------------------------------------

    def run(self, manage_gc: bool = False) -> None:
        """Run the app until quit.

        manage_gc (the CLI, which owns the process): full collections only while keys
        pause. Automatic ones landed on keystrokes (bench/editor.py): 40-70 ms over the
        loaded libraries, 6-14 ms after freezing those. Young collections stay automatic
        (about a millisecond); the oldest generation is collected when idle.
        """
        old = gc.get_threshold()
        if manage_gc:
            gc.collect()
            gc.freeze()  # what is loaded now (model bindings, prompt-toolkit) stays
            gc.set_threshold(old[0], old[1], 1_000_000)
            self._manage_gc = True
        try:
            self.app.run(pre_run=self._pre_run)
        finally:
            if manage_gc:
                gc.set_threshold(*old)
            self.shutdown()

    def _gc_tick(self) -> None:
        """Every GC_TICK_S: a full collection once keys have paused (at most every GC_EVERY_S)."""
        now = time.monotonic()
        if now - self._last_key > GC_IDLE_S and now - self._last_gc > GC_EVERY_S:
            t = time.perf_counter()
            gc.collect()
            self._last_gc = time.monotonic()
            self.trace("gc", ms=round((time.perf_counter() - t) * 1000, 2))
        if self.loop is not None:
            self.loop.call_later(GC_TICK_S, self._gc_tick)

    def _pre_run(self) -> None:
        self.loop = self.app.loop
        self.app.vi_state.input_mode = InputMode.NAVIGATION  # vi starts in normal mode
        if self.recovered is not None:
            self.offer_recovery(self.recovered)
        elif not self.message[1]:
            self.info(self._open_message())
        self.suggest.on_open()  # the window at the end of the document: restored or prefilled
        if self._manage_gc:
            self.loop.call_later(GC_TICK_S, self._gc_tick)
        self.trace("ready")

    def _open_message(self) -> str:
        name = self.ebuf.display_name
        if self.ebuf.is_new:
            return f'"{name}" [new file]'
        t = self.buffer.text
        return f'"{name}" {t.count(chr(10)) + (0 if t.endswith(chr(10)) or not t else 1)}L, {len(self.ebuf.encode())}B'

    def shutdown(self) -> None:
        self.suggest.cancel_timer()
        if self._mirror_handle is not None:
            self._mirror_handle.cancel()
        if self.worker is not None:
            self.worker.close()
            try:
                self.suggest.save_state()
            except Exception as e:  # a cache: never in the way of quitting
                self.trace("save_state_error", error=repr(e))
        self.bg.flush()
        self.bg.close()
        if self._trace_fh is not None:
            self._trace_fh.close()
            self._trace_fh = None

    def kv_store_bytes(self) -> int:
        """Disk bound of the saved KV states (kvcache.py); 0 with --no-log (they encode the text)."""
        return self.config.kv_cache_mb * 2**20 if self.log_enabled else 0

    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the UI thread (safe to call from any thread)."""
        loop = self.loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the app has exited
            pass

    def invalidate(self) -> None:
        self.app.invalidate()

    def trace(self, ev: str, **kw) -> None:
        """MORPH_EDITOR_TRACE=FILE: JSON lines with CLOCK_MONOTONIC times (bench/editor.py)."""
        if self._trace_fh is not None:
            kw.update(ev=ev, t=time.monotonic())
            self._trace_fh.write(json.dumps(kw) + "\n")

    # --- modes ---------------------------------------------------------------------

    def main_focused(self) -> bool:
        try:
            return self.app.layout.current_buffer is self.buffer
        except Exception:
            return False

    def insert_mode(self) -> bool:
        if not self.main_focused():
            return False
        if self.app.editing_mode == EditingMode.EMACS:
            return True
        return self.app.vi_state.input_mode in (InputMode.INSERT, InputMode.INSERT_MULTIPLE)

    def mode_name(self) -> str:
        if self.command_line_focused():
            return "COMMAND"
        if self.app.editing_mode == EditingMode.EMACS:
            return "EMACS"
        if self.buffer.selection_state is not None:
            return "VISUAL"
        return {
            InputMode.INSERT: "INSERT",
            InputMode.INSERT_MULTIPLE: "INSERT",
            InputMode.NAVIGATION: "NORMAL",
            InputMode.REPLACE: "REPLACE",
            InputMode.REPLACE_SINGLE: "REPLACE",
        }.get(self.app.vi_state.input_mode, "NORMAL")

    def busy_with_popup(self) -> bool:
        return self.panel.is_open or self.seed.active or self.confirm is not None or self.command_line_focused()

    def command_line_focused(self) -> bool:
        try:
            return self.app.layout.current_buffer is self.command_buffer
        except Exception:
            return False

    def _after_key(self, _=None) -> None:
        self._last_key = time.monotonic()
        if self.worker is not None:
            # A background prefill gives way while keys come, so that the suggestion after
            # the pause finds the worker free; it goes on once keys pause.
            self.worker.pause_idle()
            if self._resume_handle is not None:
                self._resume_handle.cancel()
            if self.loop is not None:
                # after the suggestion the pause starts (debounce_ms) was submitted
                self._resume_handle = self.loop.call_later(self.config.debounce_ms / 1000.0 + 0.05,
                                                           self.worker.resume_idle)
        if self._trace_fh is not None:
            self.trace("key")
        # Leaving insert mode (vi Esc) dismisses a suggestion shown or on its way (the F2
        # panel only hides it: it shows its scores).
        if self.suggest.current is not None and not self.insert_mode() and not self.panel.is_open:
            self.suggest.dismiss()

    # --- messages --------------------------------------------------------------------

    def info(self, text: str) -> None:
        self.message = ("message", text)
        self.invalidate()

    def error(self, text: str) -> None:
        self.message = ("message.error", text)
        self.invalidate()

    def ask(self, question: str, choices: dict[str, Callable[[], None]], on_cancel=None) -> None:
        self.suggest.dismiss()
        self.confirm = Confirm(question, choices, on_cancel)
        self.invalidate()

    def answer(self, key: str) -> None:
        c = self.confirm
        if c is None:
            return
        self.confirm = None
        self.message = ("", "")
        action = c.choices.get(key)
        if action is not None:
            action()
        elif c.on_cancel is not None:
            c.on_cancel()
        self.invalidate()

    def _worker_error(self, job, exc: BaseException) -> None:
        msg = str(exc) if isinstance(exc, MorphError) else f"{type(exc).__name__}: {exc}"
        self.post(self.error, f"{job.kind} failed: {msg}")

    # --- command line ------------------------------------------------------------------

    def open_command_line(self, text: str = "") -> None:
        self.suggest.dismiss()
        self.command_buffer.reset()
        self.command_buffer.insert_text(text)
        self.app.layout.focus(self.command_buffer)
        self.app.vi_state.input_mode = InputMode.INSERT

    def close_command_line(self) -> None:
        self.command_buffer.reset()
        self.app.layout.focus(self.buffer)
        self.app.vi_state.input_mode = InputMode.NAVIGATION

    def run_command_line(self) -> None:
        from morph.editor.commands import execute

        line = self.command_buffer.text
        self.close_command_line()
        execute(self, line)

    # --- text changes, recovery -----------------------------------------------------------

    def _on_text_changed(self, _=None) -> None:
        self.suggest.on_change()
        if self._mirror_handle is None and self.loop is not None:
            self._mirror_handle = self.loop.call_later(MIRROR_DELAY_S, self._mirror)

    def _mirror(self) -> None:
        self._mirror_handle = None
        path = self.path
        if self.ebuf.modified:
            text = self.buffer.text
            self.bg.submit(lambda: recovery.write(path, text), db=False)
            self._mirrored = True
        elif self._mirrored:
            self.bg.submit(lambda: recovery.remove(path), db=False)
            self._mirrored = False

    def offer_recovery(self, rec) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.ts))
        n = len(rec.text)

        def restore():
            self.buffer.save_to_undo_stack()
            self.buffer.text = rec.text
            self.buffer.cursor_position = min(len(rec.text), self.buffer.cursor_position)
            self._mirrored = True
            self.info(f"recovered {n} characters from {when}: :w to keep them, u to undo")

        def discard():
            recovery.remove(self.path)
            self.info("recovery file discarded")

        self.ask(
            f"Unsaved text of this file from {when} ({n} chars) was recovered. "
            "[r]estore it, [d]iscard it, or any other key to keep it for later",
            {"r": restore, "d": discard},
            on_cancel=lambda: self.info("recovery kept for the next start"),
        )

    # --- saving and quitting ---------------------------------------------------------------

    def write(self, target: str | None = None, force: bool = False, then: Callable[[], None] | None = None) -> None:
        """`:w [PATH]`; asks before overwriting a file changed on disk since it was read."""
        try:
            dest = None if target is None else user_path(target).absolute()
        except MorphError as e:
            self.error(f"E: not written: {e} (the buffer is kept)")
            return
        own = dest is None or dest == self.path
        if own and not force and self.ebuf.changed_on_disk():
            def yes():
                if self._save(None) and then is not None:
                    then()

            self.ask(
                f"{self.ebuf.display_name} changed on disk since it was read. Overwrite it? [y/n]",
                {"y": yes},
                on_cancel=lambda: self.info("not written (:e! is not supported; save elsewhere with :w PATH)"),
            )
            return
        if not own and not force and dest.exists():
            self.error(f"E13: {target} exists (add ! to overwrite)")
            return
        if self._save(None if own else target) and then is not None:
            then()

    def _save(self, target: str | None) -> bool:
        t0 = time.perf_counter()
        try:
            self.ebuf.save(None if target is None else Path(target))
        except OSError as e:
            where = e.filename or (target or self.ebuf.display_name)
            self.error(f"E: not written: {where}: {e.strerror or e} (the buffer is kept)")
            return False
        except UnicodeEncodeError as e:  # a lone surrogate: no UTF-8 for it
            self.error(f"E: not written: {target or self.ebuf.display_name}: character {e.object[e.start]!a} "
                       f"at offset {e.start} cannot be written as UTF-8 (the buffer is kept)")
            return False
        text = self.buffer.text if target is None else None
        nbytes = len(self.ebuf.encode())
        self.info(f'"{target or self.ebuf.display_name}" {nbytes}B written')
        self.trace("saved", ms=round((time.perf_counter() - t0) * 1000, 2))
        if target is None:
            path = self.path
            if self.log_enabled:
                self.bg.submit(lambda db: history.add_version(db, path, text))
            if not self.ebuf.modified:
                self.bg.submit(lambda: recovery.remove(path), db=False)
                self._mirrored = False
        return True

    def quit(self, force: bool = False) -> None:
        if self.ebuf.modified and not force:
            self.error("E37: No write since last change (add ! to override)")
            return
        self.suggest.dismiss()
        if self.worker is not None:
            self.worker.cancel()
        if force:  # the user chose to drop the unsaved text
            self.bg.submit(lambda p=self.path: recovery.remove(p), db=False)
        elif not self.ebuf.modified:
            self.bg.submit(lambda p=self.path: recovery.remove(p), db=False)
        if self._mirror_handle is not None:
            self._mirror_handle.cancel()
            self._mirror_handle = None
        self.app.exit()

    def ctrl_q(self) -> None:
        """Emacs-friendly quit: a second Ctrl-Q within 3 s drops unsaved changes."""
        if not self.ebuf.modified:
            self.quit()
        elif time.monotonic() - self._quit_armed < 3.0:
            self.quit(force=True)
        else:
            self._quit_armed = time.monotonic()
            self.error("unsaved changes: Ctrl-S saves; Ctrl-Q again quits without saving")

    # --- steering ------------------------------------------------------------------------

    @property
    def profile(self) -> dict[str, float]:
        """The active features in their stored form, {"formal@sae": 0.3}."""
        return self.features.items if self.features is not None else {}

    @property
    def steering(self):
        return self.features.vector() if self.features is not None else None

    def _profile(self):
        if self.features is None:
            if self._loader is not None and self.engine is None:
                raise MorphError("the model is still loading: try again in a moment")
            raise MorphError("no feature catalog (no model loaded)")
        return self.features

    def apply_feature(self, spec) -> list[str]:
        """Apply one parsed request (steering/profile.py grammar); returns the keys changed."""
        changed = self._profile().apply(spec)
        self._steering_changed()
        return changed

    def set_feature(self, spec: str, scale: float | None) -> str:
        """Turn a feature on at `scale` (None: its default); returns its key. MorphError if unknown."""
        key = self._profile().set(spec, scale)
        self._steering_changed()
        return key

    def unset_feature(self, spec: str) -> list[str]:
        keys = self._profile().remove(spec)
        self._steering_changed()
        return keys

    def _steering_changed(self) -> None:
        self.suggest.invalidate_warm()
        self.suggest.drop("cancelled")
        if self.log_enabled:
            path, prof = self.path, dict(self.profile)
            self.bg.submit(lambda db: history.save_profile(db, path, prof))

    def features_label(self) -> str:
        if not self.profile:
            return "no features"
        return " ".join(f"{k.split('@')[0]} {v:+.2f}" for k, v in self.profile.items())

    # --- history ---------------------------------------------------------------------------

    def log_suggestion(self, action, text, accepted, features, ttft_s, tok_per_s, chosen=None) -> None:
        """`chosen`: which alternative showed and its scores (None: no alternatives were ready)."""
        self.trace("log", action=action, chars=len(text), accepted=len(accepted or ""),
                   alternative=chosen["alternative"] if chosen else None)
        if not self.log_enabled or not text:
            return
        path = self.path
        self.bg.submit(
            lambda db: history.log_suggestion(db, path, action, text, accepted, features, ttft_s, tok_per_s, chosen)
        )


def _open_trace():
    p = os.environ.get("MORPH_EDITOR_TRACE")
    if not p:
        return None
    try:
        return open(p, "a", buffering=1, encoding="utf-8")
    except OSError:
        return None
