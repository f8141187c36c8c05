"""The steering panel (F2): the catalog's features, on/off and strength, per document.

Keys in the panel: Up/Down or j/k move, Space/Enter toggles, +/- (or Right/Left) change
the strength by 0.05, 0 resets it to the feature's default, Esc/F2/q close. A change
cancels the suggestion on screen; the next one uses the new profile, which is stored with
the document in morph.db. Without a change the suggestion is only hidden while the panel
is open, and its line at the bottom shows its scores (editor/alternatives.py).
"""

from __future__ import annotations

from prompt_toolkit.filters import Condition
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.layout import ConditionalContainer, Dimension, Window
from prompt_toolkit.layout.controls import FormattedTextControl
from prompt_toolkit.widgets import Frame

from morph.errors import MorphError

STEP = 0.05


class FeaturePanel:
    def __init__(self, editor):
        self.ed = editor
        self.is_open = False
        self.index = 0
        self._control = FormattedTextControl(self._fragments, focusable=True, key_bindings=self._keys(), show_cursor=False)
        self._window = Window(self._control, width=Dimension(min=40, max=100, preferred=100), wrap_lines=False)

    @property
    def features(self):
        return self.ed.catalog.features if self.ed.catalog is not None else []

    def container(self):
        return ConditionalContainer(
            Frame(self._window, title="Features  (Space on/off · +/- strength · 0 default · Esc close)", style="class:panel"),
            filter=Condition(lambda: self.is_open),
        )

    def toggle(self) -> None:
        self.close() if self.is_open else self.open()

    def open(self) -> None:
        if not self.ed.suggest.shown():
            self.ed.suggest.dismiss()  # one on its way: the panel may change what it would be
        self.is_open = True
        self.ed.app.layout.focus(self._window)
        self.ed.invalidate()

    def close(self) -> None:
        self.is_open = False
        self.ed.app.layout.focus(self.ed.buffer)
        if not self.ed.suggest.shown():
            self.ed.suggest.schedule()
        self.ed.invalidate()

    # --- model ------------------------------------------------------------------------

    def _selected(self):
        feats = self.features
        if not feats:
            return None
        self.index = max(0, min(self.index, len(feats) - 1))
        return feats[self.index]

    def toggle_selected(self) -> None:
        f = self._selected()
        if f is None:
            return
        try:
            if f.key in self.ed.profile:
                self.ed.unset_feature(f.key)
            else:
                self.ed.set_feature(f.key, None)
        except MorphError as e:
            self.ed.error(str(e))

    def change(self, delta: float | None) -> None:
        """delta None: back to the default scale."""
        f = self._selected()
        if f is None:
            return
        cur = self.ed.profile.get(f.key, 0.0 if delta is not None else f.default_scale)
        new = f.default_scale if delta is None else round(cur + delta, 4)  # 0.05 steps stay exact
        try:
            if abs(new) < 1e-9:
                self.ed.unset_feature(f.key)
            else:
                self.ed.set_feature(f.key, new)
        except MorphError as e:
            self.ed.error(str(e))

    # --- view ---------------------------------------------------------------------------

    def _fragments(self):
        feats = self.features
        line = self.ed.suggest.scores_line()
        tail = [("class:panel.dim", f"\n{line}  (Alt-] / Alt-[ in the text)\n")] if line else []
        if not feats:
            return [
                ("class:panel.dim", "No features for this model yet.\n"),
                ("class:panel.dim", "Build some with `morph vectors build`, or see `morph features`.\n"),
            ] + tail
        out = []
        width = max(len(f.name) for f in feats)
        for i, f in enumerate(feats):
            on = f.key in self.ed.profile
            scale = self.ed.profile.get(f.key, f.default_scale)
            mark = "[x]" if on else "[ ]"
            sel = "class:panel.selected " if i == self.index else ""
            out.append((sel + ("class:panel.on" if on else ""), f" {mark} {f.name:<{width}}"))
            out.append((sel, f"  {f.method:<8} {scale:+.2f}  {f.eval_label:<32} "))
            out.append((sel + "class:panel.dim", f"{f.description}\n"))
        return out + tail

    def _keys(self) -> KeyBindings:
        kb = KeyBindings()

        def add(*keys):
            return kb.add(*keys, eager=True)

        @add("up")
        @add("k")
        @add("c-p")
        def _(e):
            self.index = max(0, self.index - 1)

        @add("down")
        @add("j")
        @add("c-n")
        def _(e):
            self.index = min(len(self.features) - 1, self.index + 1) if self.features else 0

        @add("space")
        @add("enter")
        def _(e):
            self.toggle_selected()

        @add("+")
        @add("=")
        @add("right")
        @add("l")
        def _(e):
            self.change(STEP)

        @add("-")
        @add("left")
        @add("h")
        def _(e):
            self.change(-STEP)

        @add("0")
        def _(e):
            self.change(None)

        @add("escape")
        @add("q")
        @add("f2")
        @add("c-c")
        def _(e):
            self.close()

        return kb
