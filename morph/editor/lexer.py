"""Markdown highlighting with pygments, lexing from the nearest blank line (not the file start).

A keystroke makes a new document; lexing from the start of a long file on every one would
cost milliseconds per line drawn. Blank lines are safe restart points for Markdown prose.
"""

from __future__ import annotations

from pathlib import Path

from prompt_toolkit.lexers import Lexer, PygmentsLexer, RegexSync, SimpleLexer

MARKDOWN_SUFFIXES = {".md", ".markdown", ".mdown", ".mkd", ".txt", ""}


def lexer_for(path: Path) -> Lexer:
    if path.suffix.lower() in MARKDOWN_SUFFIXES:
        from pygments.lexers.markup import MarkdownLexer

        return PygmentsLexer(MarkdownLexer, sync_from_start=False, syntax_sync=RegexSync(r"^\s*$"))
    try:
        from pygments.lexers import get_lexer_for_filename
        from pygments.util import ClassNotFound

        try:
            cls = type(get_lexer_for_filename(path.name))
        except ClassNotFound:
            return SimpleLexer()
        return PygmentsLexer(cls, sync_from_start=False, syntax_sync=RegexSync(r"^\s*$"))
    except ImportError:  # pygments is a dependency; stay usable without it anyway
        return SimpleLexer()
