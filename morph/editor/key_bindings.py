"""Key bindings on top of prompt-toolkit's vi (default) or emacs bindings.

Suggestions (when ghost text is shown):
  Tab                      accept all of it
  Ctrl-Right, Ctrl-B (vi), Alt-f (emacs)   accept the next word
  Ctrl-E, End, Shift-Tab   accept the next line
  Alt-] / Alt-[            the next / previous alternative (once they are decoded)
  Ctrl-]                   dismiss, stay in insert mode
  Esc                      vi: dismiss and leave insert mode; emacs: dismiss
  (typing anything else cancels it; a new one comes after a pause)
Everywhere: Ctrl-S save, Ctrl-Q quit (twice to drop changes), F2 feature panel,
F3 explain word, F4 expand sentence, F5 compress sentence.
vi normal mode: `:` ex commands, K explain word, \\e / \\c expand / compress sentence,
\\E / \\C expand / compress paragraph. Emacs: Alt-x opens the command line.
"""

from __future__ import annotations

from prompt_toolkit.filters import (
    Condition,
    emacs_mode,
    has_focus,
    vi_insert_mode,
    vi_mode,
    vi_navigation_mode,
)
from prompt_toolkit.key_binding.vi_state import InputMode
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.keys import Keys


def build_key_bindings(ed) -> KeyBindings:
    kb = KeyBindings()
    ghost = Condition(ed.suggest.visible)
    main = Condition(ed.main_focused)
    confirm = Condition(lambda: ed.confirm is not None)
    free = Condition(lambda: not ed.busy_with_popup())
    normal = vi_navigation_mode & main & free

    # --- one-key questions (overwrite? restore?) take every key first ---------------
    @kb.add(Keys.Any, filter=confirm, eager=True)
    @kb.add("escape", filter=confirm, eager=True)
    @kb.add("c-c", filter=confirm, eager=True)
    @kb.add("enter", filter=confirm, eager=True)
    def _(event):
        key = event.key_sequence[0].key
        ed.answer(key.lower() if isinstance(key, str) and len(key) == 1 else "")

    # --- suggestions -------------------------------------------------------------------
    @kb.add("tab", filter=ghost & ~confirm)
    def _(event):
        ed.suggest.accept("all")

    @kb.add("c-right", filter=ghost & ~confirm)
    @kb.add("c-b", filter=ghost & vi_mode & ~confirm)
    @kb.add("escape", "f", filter=ghost & emacs_mode & ~confirm)
    def _(event):
        ed.suggest.accept("word")

    @kb.add("c-e", filter=ghost & ~confirm)
    @kb.add("end", filter=ghost & ~confirm)
    @kb.add("s-tab", filter=ghost & ~confirm)
    def _(event):
        ed.suggest.accept("line")

    @kb.add("escape", "]", filter=ghost & ~confirm)
    def _(event):
        ed.suggest.cycle(1)

    @kb.add("escape", "[", filter=ghost & ~confirm)
    def _(event):
        ed.suggest.cycle(-1)

    @kb.add("c-]", filter=ghost & ~confirm)
    def _(event):
        ed.suggest.dismiss()

    @kb.add("escape", filter=ghost & emacs_mode & ~confirm)
    def _(event):
        ed.suggest.dismiss()

    @kb.add("escape", filter=ghost & vi_insert_mode & ~confirm)
    def _(event):
        # Dismiss, then what vi's own Esc does: back one character, normal mode.
        ed.suggest.dismiss()
        buf = event.current_buffer
        buf.cursor_position += buf.document.get_cursor_left_position()
        event.app.vi_state.input_mode = InputMode.NAVIGATION

    # --- files -------------------------------------------------------------------------
    @kb.add("c-s", filter=~confirm)
    def _(event):
        if ed.command_line_focused():
            ed.close_command_line()
        ed.write()

    @kb.add("c-q", filter=~confirm)
    def _(event):
        ed.ctrl_q()

    # --- command line ------------------------------------------------------------------
    @kb.add(":", filter=normal)
    def _(event):
        ed.open_command_line()

    @kb.add("escape", "x", filter=emacs_mode & main & free)
    def _(event):
        ed.open_command_line()

    cmd = has_focus(ed.command_buffer)

    @kb.add("enter", filter=cmd)
    def _(event):
        ed.run_command_line()

    @kb.add("escape", filter=cmd, eager=True)
    @kb.add("c-c", filter=cmd)
    def _(event):
        ed.close_command_line()

    @kb.add("backspace", filter=cmd & Condition(lambda: not ed.command_buffer.text))
    def _(event):
        ed.close_command_line()

    @kb.add("tab", filter=cmd)
    def _(event):
        from morph.editor.commands import complete

        complete(ed)

    # --- panels and seed UX --------------------------------------------------------------
    @kb.add("f2", filter=~confirm)
    def _(event):
        ed.panel.toggle()

    @kb.add("K", filter=normal)
    @kb.add("f3", filter=main & free)
    def _(event):
        ed.seed.explain()

    for keys, kind, scope in (
        (("\\", "e"), "expand", "sentence"),
        (("\\", "c"), "compress", "sentence"),
        (("\\", "E"), "expand", "paragraph"),
        (("\\", "C"), "compress", "paragraph"),
    ):
        kb.add(*keys, filter=normal)(_telescope(ed, kind, scope))
    kb.add("f4", filter=main & free)(_telescope(ed, "expand", "sentence"))
    kb.add("f5", filter=main & free)(_telescope(ed, "compress", "sentence"))
    return kb


def _telescope(ed, kind: str, scope: str):
    def handler(event):
        ed.seed.telescope(kind, scope)

    return handler
