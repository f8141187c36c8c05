"""Chat messages to token ids: the template's control tokens parsed, message text kept as text.

Tokenizing a whole chat rendering with special tokens parsed lets a message that contains
`<|im_end|><|im_start|>system ...` (stdin to `morph steer`, a REPL line, a server request)
open turns of its own. Here the template is rendered a second time with every message's
content replaced by a unique placeholder: what the placeholders leave is the template's
own text, split at its control tokens; message text goes in as plain text (special=False,
as for any prompt). Every engine calls this with its own tokenizer, so the engines agree.

Ordinary messages (no control-token string in any content) take the old path, the whole
rendering tokenized at once, so their ids are exactly what they were.
"""

from __future__ import annotations

import re
import secrets

from morph.errors import MorphError


def chat_token_ids(engine, messages: list[dict]) -> list[int]:
    """Token ids of `messages` in the engine's chat template, generation prompt added.

    `engine` supplies format_chat, tokenize(text, add_bos, special), detokenize(ids,
    special) and is_control(id) (a token only special=True produces)."""
    real = engine.format_chat(messages)
    contents = {i: m["content"] for i, m in enumerate(messages) if isinstance(m.get("content"), str)}

    def controls(text: str) -> list[int]:
        return [t for t in engine.tokenize(text, add_bos=False, special=True) if engine.is_control(t)]

    if not any(controls(c) for c in contents.values()):
        return engine.tokenize(real, add_bos=False, special=True)
    nonce = secrets.token_hex(8)
    masked = [dict(m, content=f"\ue000{nonce}:{i}\ue001") if i in contents else m for i, m in enumerate(messages)]
    parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", engine.format_chat(masked))
    # parts: template text, message index, template text, ... (odd positions are indices)
    for shown in (lambda c: c, str.strip):  # templates that `| trim` the content
        pieces = [p if k % 2 == 0 else shown(contents[int(p)]) for k, p in enumerate(parts)]
        if "".join(pieces) == real:
            return _splice(engine, pieces)
    # The template changes message text beyond that: safe as a whole only when the rendering
    # holds exactly the template's own control tokens.
    if controls(real) == controls("".join(parts[::2])):
        return engine.tokenize(real, add_bos=False, special=True)
    raise MorphError("message text holds the model's control tokens (e.g. <|im_end|>) and this chat template "
                     "rewrites message text, so they cannot be kept as plain text: remove them")


def _splice(engine, pieces: list[str]) -> list[int]:
    """Ids of "".join(pieces): even pieces (template text) split at their control tokens,
    the text between control tokens (template and message text alike) tokenized as plain."""
    ids: list[int] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            ids.extend(engine.tokenize("".join(text), add_bos=False, special=False))
            text.clear()

    for k, piece in enumerate(pieces):
        if k % 2:
            text.append(piece)
            continue
        pos = 0
        for start, end, tok in _control_spans(engine, piece):
            text.append(piece[pos:start])
            flush()
            ids.append(tok)
            pos = end
        text.append(piece[pos:])
    flush()
    return ids


def _control_spans(engine, text: str) -> list[tuple[int, int, int]]:
    """(start, end, id) of each control token in `text`, in order."""
    spans, pos = [], 0
    for tok in engine.tokenize(text, add_bos=False, special=True):
        if engine.is_control(tok):
            s = engine.detokenize([tok], special=True)
            start = text.find(s, pos)
            if start < 0:  # a control token whose text is not its string: cannot place it
                raise MorphError(f"chat template: cannot locate control token {tok} ({s!r}) in its text")
            spans.append((start, start + len(s), tok))
            pos = start + len(s)
    return spans



class EngineCommon:
    """What both engines do alike: model sizes, a request's prompt ids and the
    context-length check."""

    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_layer(self) -> int:
        return self._n_layer

    def prepare_tokens(self, request) -> list[int]:
        if request.messages is not None:
            return chat_token_ids(self, request.messages)
        if request.prompt is None:
            raise MorphError("request needs a prompt or messages")
        return self.tokenize(request.prompt, add_bos=request.add_bos)

    def checked_prompt(self, request) -> tuple[list[int], int]:
        """`request`'s prompt ids and token budget, refused when empty or too long."""
        tokens = self.prepare_tokens(request)
        if not tokens:
            raise MorphError("empty prompt")
        max_tokens = max(0, int(request.max_tokens))
        self.check_fits(len(tokens), max_tokens)
        return tokens, max_tokens

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.n_ctx:
            raise MorphError(
                f"input is {n_prompt} tokens; with {max_tokens} to generate that exceeds the "
                f"context of {self.n_ctx} tokens"
            )
