"""Markdown highlighting with pygments, one line at a time, cached.

prompt-toolkit's PygmentsLexer re-lexes from a sync point at least 50 lines back on every
keystroke (each keystroke is a new document), which costs tens of milliseconds on a long
document. Markdown is line-local apart from fenced code blocks, so we lex each line on its
own with pygments' MarkdownLexer, cache the result by line text (typing re-lexes one
line), and mark fenced blocks with one cheap scan per document.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable

from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.lexers import Lexer, PygmentsLexer, SimpleLexer
from prompt_toolkit.styles.pygments import pygments_token_to_classname

MARKDOWN_SUFFIXES = {".md", ".markdown", ".mdown", ".mkd", ".txt", ""}
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
CODE_STYLE = "class:pygments.literal.string.backtick"


class MarkdownLexer(Lexer):
    """Plain text until pygments is imported (at once, or on a thread by `load()`): its
    Markdown rules take ~40 ms to import, which the editor spends after the first paint."""

    def __init__(self, load_now: bool = True):
        self._pygments = None
        self._lex_line = lru_cache(maxsize=8192)(self._lex_line_uncached)
        if load_now:
            self._import()

    def _import(self) -> None:
        from pygments.lexers.markup import MarkdownLexer as PygmentsMarkdown

        self._pygments = PygmentsMarkdown(stripnl=False, ensurenl=False)

    def load(self, on_ready: Callable[[], None] | None = None) -> None:
        """Import pygments on a thread; on_ready() once lines are highlighted."""
        def run():
            try:
                self._import()
            except ImportError:  # pygments is a dependency; stay usable without it anyway
                return
            if on_ready is not None:
                on_ready()

        threading.Thread(target=run, name="morph-lexer", daemon=True).start()

    def _lex_line_uncached(self, line: str) -> tuple:
        # Pygments' rules expect the newline (headings are `^#.+\n`); lex it, then drop it.
        out, n = [], len(line)
        for i, token, text in self._pygments.get_tokens_unprocessed(line + "\n"):
            text = text[: max(0, n - i)]
            if text:
                out.append(("class:" + pygments_token_to_classname(token), text))
        return tuple(out)

    def lex_document(self, document: Document) -> Callable[[int], StyleAndTextTuples]:
        lines = document.lines
        # Every keystroke is a new document: on a book, scanning all lines for fences costs
        # ~1 ms a keystroke, a substring search ~0.05 ms.
        has_fence = "```" in document.text or "~~~" in document.text
        fenced: list[bool] | None = None

        def in_fence(i: int) -> bool:
            nonlocal fenced
            if not has_fence:
                return False
            if fenced is None:
                fenced, inside = [], False
                for ln in lines:
                    if _FENCE.match(ln):
                        fenced.append(True)  # the fence line itself is code-styled
                        inside = not inside
                    else:
                        fenced.append(inside)
            return fenced[i]

        def get_line(i: int) -> StyleAndTextTuples:
            if i >= len(lines):
                return []
            line = lines[i]
            if not line:
                return []
            if in_fence(i):
                return [(CODE_STYLE, line)]
            if self._pygments is None:
                return [("", line)]
            return list(self._lex_line(line))

        return get_line


def lexer_for(path: Path, deferred: bool = False) -> Lexer:
    """deferred: a Markdown lexer that highlights once its `load()` ran (the editor's)."""
    try:
        if path.suffix.lower() in MARKDOWN_SUFFIXES:
            return MarkdownLexer(load_now=not deferred)
        from pygments.lexers import get_lexer_for_filename
        from pygments.util import ClassNotFound

        try:
            cls = type(get_lexer_for_filename(path.name))
        except ClassNotFound:
            return SimpleLexer()
        return PygmentsLexer(cls, sync_from_start=False)
    except ImportError:  # pygments is a dependency; stay usable without it anyway
        return SimpleLexer()
