"""How a piece of user text becomes a request: rewrite it, continue it, or chat.

Shared by `morph steer`, the REPL, the editor and the server so that a mode means the
same thing everywhere.
"""

from __future__ import annotations

from morph.engine.base import Request

MODES = ("rewrite", "continue", "chat")

REWRITE_SYSTEM = (
    "You are a writing assistant. Rewrite the user's text, keeping its meaning. "
    "Reply with the rewritten text only, no preamble."
)
CHAT_SYSTEM = "You are a helpful writing assistant."


def rewrite_messages(text: str) -> list[dict]:
    return [
        {"role": "system", "content": REWRITE_SYSTEM},
        {"role": "user", "content": f"Rewrite this text:\n\n{text.strip()}"},
    ]


def build_request(mode: str, text: str, **kw) -> Request:
    """`kw` are Request fields (max_tokens, temperature, steering, ...)."""
    if mode == "rewrite":
        return Request(messages=rewrite_messages(text), **kw)
    if mode == "continue":
        return Request(prompt=text, **kw)
    if mode == "chat":
        return Request(
            messages=[{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": text}],
            **kw,
        )
    raise ValueError(f"unknown mode {mode!r}")
