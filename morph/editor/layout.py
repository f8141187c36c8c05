"""Screen layout: the document, a status bar, a message/command line, and floats
(feature panel, definition popup, telescopic preview)."""

from __future__ import annotations

from prompt_toolkit.filters import Condition
from prompt_toolkit.layout import (
    ConditionalContainer,
    Dimension,
    Float,
    FloatContainer,
    HSplit,
    Layout,
    ScrollOffsets,
    Window,
)
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl
from prompt_toolkit.layout.processors import BeforeInput

from morph.editor.ghost import GhostBufferControl, GhostProcessor


def short_name(name: str, limit: int = 40) -> str:
    if len(name) <= limit:
        return name
    parts = name.split("/")
    tail = parts[-1]
    if len(parts) > 1 and len(parts[-2]) + len(tail) + 3 <= limit:
        tail = parts[-2] + "/" + tail
    return "…/" + tail if len(tail) + 2 <= limit else "…" + tail[-(limit - 1):]


def status_fragments(ed):
    left = [
        ("class:status.mode", f" {ed.mode_name()} "),
        ("class:status", f" {short_name(ed.ebuf.display_name)}"),
    ]
    if ed.ebuf.modified:
        left.append(("class:status.modified", " [+]"))
    if ed.ebuf.is_new and not ed.ebuf.modified:
        left.append(("class:status", " [new]"))
    left.append(("class:status", f"  {ed.model_name}  "))
    left.append(("class:status.features", ed.features_label()))
    return left


def status_right_fragments(ed):
    s = ed.suggest
    right = []
    pos = s.position() if s.visible() else None
    if pos is not None and pos[1] > 1:
        right.append(("class:status.timing", f"Alt-] {pos[0]}/{pos[1]}  "))
    if s.last_ttft_s is not None:
        t = f"TTFT {s.last_ttft_s * 1000:.0f} ms"
        if s.last_tok_per_s:
            t += f"  {s.last_tok_per_s:.0f} tok/s"
        right.append(("class:status.timing", t))
    right.append(("class:status", "  F2 features "))
    return right


def status_line_fragments(ed):
    """The status bar: mode, file and features on the left, timings on the right (the
    left part is cut where the two would overlap)."""
    from prompt_toolkit.application import get_app
    from prompt_toolkit.formatted_text import fragment_list_width, to_formatted_text

    left, right = status_fragments(ed), status_right_fragments(ed)
    width = get_app().output.get_size().columns
    room = width - fragment_list_width(right)
    out, used = [], 0
    for style, text, *_ in to_formatted_text(left):
        if used >= room:
            break
        text = text[: room - used]
        out.append((style, text))
        used += len(text)
    if used < room:
        out.append(("class:status", " " * (room - used)))
    return out + right


def message_fragments(ed):
    if ed.confirm is not None:
        return [("class:message.question", ed.confirm.question)]
    style, text = ed.message
    return [(f"class:{style}" if style and not style.startswith("class:") else style, text)]


def build_layout(ed) -> Layout:
    ghost = GhostProcessor(ed.suggest)
    control = GhostBufferControl(
        buffer=ed.buffer,
        lexer=ed.lexer,
        input_processors=[ghost],
        ghost=ghost,
    )
    ed.main_control = control
    main = Window(
        control,
        # An explicit preferred height: otherwise prompt-toolkit renders the buffer from
        # its first line just to learn how tall it would like to be, on every keystroke.
        height=Dimension(min=1, preferred=10_000),
        wrap_lines=True,
        scroll_offsets=ScrollOffsets(top=1, bottom=1),
    )
    ed.main_window = main
    # One window, the right part padded into place: a VSplit of two would have
    # prompt-toolkit share out the width column by column on every redraw (~2 ms).
    status = Window(FormattedTextControl(lambda: status_line_fragments(ed)), height=1,
                    wrap_lines=False, style="class:status")
    cmd_focused = Condition(ed.command_line_focused)
    command = ConditionalContainer(
        Window(BufferControl(ed.command_buffer, input_processors=[BeforeInput(":")]), height=1),
        filter=cmd_focused,
    )
    message = ConditionalContainer(
        Window(FormattedTextControl(lambda: message_fragments(ed)), height=1, wrap_lines=False),
        filter=~cmd_focused,
    )
    body = FloatContainer(
        content=HSplit([main, status, command, message]),
        floats=[
            # attach_to_window: place it at the document's cursor, not the popup's own.
            Float(content=ed.seed.popup_container(), xcursor=True, ycursor=True, attach_to_window=main),
            Float(content=ed.seed.preview_container(), top=1),
            Float(content=ed.panel.container(), top=1),
        ],
    )
    return Layout(body, focused_element=main)
