"""Colours: ghost text dim, a reverse status bar, panels with a frame; Markdown via pygments."""

from __future__ import annotations

from prompt_toolkit.styles import Style, merge_styles, style_from_pygments_cls

EDITOR_STYLE = Style.from_dict(
    {
        "ghost": "fg:ansibrightblack italic",
        "status": "reverse",
        "status.mode": "reverse bold",
        "status.modified": "reverse bold fg:ansired",
        "status.features": "reverse fg:ansiblue",
        "status.timing": "reverse",
        "message": "",
        "message.error": "fg:ansired bold",
        "message.question": "fg:ansiyellow bold",
        "panel": "bg:#202020 fg:#d0d0d0",
        "panel.title": "bold",
        "panel.selected": "reverse",
        "panel.on": "fg:ansigreen bold",
        "panel.dim": "fg:#808080",
        "popup": "bg:#262626 fg:#e0e0e0",
        "popup.title": "bold fg:ansicyan",
        "popup.dim": "fg:#909090",
        "preview.old": "fg:#909090",
        "preview.new": "fg:ansigreen",
    }
)


def editor_style(markdown: bool = True) -> Style:
    """markdown=False: without pygments' token colours (they are imported after the first paint)."""
    if not markdown:
        return EDITOR_STYLE
    try:
        from pygments.styles import get_style_by_name

        md = style_from_pygments_cls(get_style_by_name("default"))
        return merge_styles([md, EDITOR_STYLE])
    except Exception:  # a broken pygments style must not stop the editor
        return EDITOR_STYLE
