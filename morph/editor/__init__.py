"""`morph write`: a vi-style (or emacs) prompt-toolkit editor with streamed, steerable ghost text.

Modules, one concern each: buffer (file I/O, saved state), ghost (suggestions and their
drawing), worker (the engine thread), key_bindings, layout, style, lexer, commands (ex
commands), panel (F2 features), seed (explain, expand/compress), recovery, history.
"""

from morph.editor.buffer import EditorBuffer, read_text
from morph.editor.editor import Editor

__all__ = ["Editor", "EditorBuffer", "read_text"]
