"""Ex commands typed after `:` (vi) or Alt-x (emacs).

  :w [PATH]   write (to PATH: a copy; ! overwrites an existing PATH or a file changed on disk)
  :wq, :x     write and quit (:x writes only if changed)
  :q, :q!     quit (refused while unsaved) / quit dropping changes
  :feature NAME [SCALE|default|off], :feature off   steer with a feature (steering/profile.py)
  :features   the feature panel (F2)
  :explain, :expand [para], :compress [para]   seed UX at the cursor
  :N          go to line N
"""

from __future__ import annotations

import os
import re

from morph.errors import MorphError
from morph.steering import profile

COMMANDS = ["w", "wq", "x", "q", "feature", "features", "explain", "expand", "compress", "help"]
HELP = (
    ":w [PATH]  :wq  :x  :q  :q!  :feature NAME [SCALE|default|off]  :features  :explain  "
    ":expand [para]  :compress [para]  | Tab accept, Ctrl-Right word, Ctrl-E line, Ctrl-] dismiss, F2 features"
)
_CMD = re.compile(r"^\s*([A-Za-z]+)(!?)\s*(.*?)\s*$")


def execute(ed, line: str) -> None:
    line = line.strip().lstrip(":").strip()
    if not line:
        return
    if line.isdecimal():  # not isdigit(): "¹" is a digit that int() refuses
        goto_line(ed, int(line))
        return
    m = _CMD.match(line)
    if not m:
        ed.error(f"E492: Not an editor command: {line}")
        return
    name, bang, arg = m.group(1), m.group(2) == "!", m.group(3)
    try:
        _dispatch(ed, name, bang, arg, line)
    except MorphError as e:
        ed.error(str(e))


def _dispatch(ed, name: str, bang: bool, arg: str, line: str) -> None:
    if name in ("w", "write"):
        ed.write(arg or None, force=bang)
    elif name in ("wq", "x", "xit", "exit"):
        if name != "wq" and not ed.ebuf.modified and not arg:
            ed.quit()
        else:
            ed.write(arg or None, force=bang, then=lambda: ed.quit(force=bool(arg)))
    elif name in ("q", "quit"):
        ed.quit(force=bang)
    elif name in ("feature", "f"):
        _feature(ed, arg)
    elif name == "features":
        ed.panel.open()
    elif name == "explain":
        ed.seed.explain()
    elif name in ("expand", "compress"):
        scope = "paragraph" if arg.startswith("p") else "sentence"
        ed.seed.telescope(name, scope)
    elif name == "help":
        ed.info(HELP)
    else:
        ed.error(f"E492: Not an editor command: {line}")


def _feature(ed, arg: str) -> None:
    if not arg.split():
        ed.info(f"features: {ed.features_label()}  (:feature NAME [SCALE|default|off], :feature off, F2)")
        return
    spec = profile.parse_words(arg.split())
    changed = ed.apply_feature(spec)
    if spec.off or spec.all_off:
        ed.info(f"{', '.join(changed)} off" if changed else f"{spec.name or 'no feature'} was not active")
        return
    ed.info(f"{changed[0]} at {ed.profile[changed[0]]:+.2f} (applies to the next suggestion)")


def goto_line(ed, n: int) -> None:
    doc = ed.buffer.document
    row = max(0, min(n - 1, doc.line_count - 1))
    ed.buffer.cursor_position = doc.translate_row_col_to_index(row, 0)


def complete(ed) -> None:
    """Tab on the command line: complete a command or a feature name."""
    buf = ed.command_buffer
    text = buf.text
    words = text.split(" ")
    if len(words) == 1:
        cands = [c for c in COMMANDS if c.startswith(words[0])]
    elif words[0] in ("feature", "f") and len(words) == 2 and ed.catalog is not None:
        cands = [n for n in ed.catalog.names() if n.startswith(words[1])]
        cands = [f"{words[0]} {c}" for c in cands]
    else:
        return
    if len(cands) == 1:
        buf.text = cands[0] + " "
    elif cands:
        buf.text = os.path.commonprefix(cands)
        ed.info("  ".join(cands))  # shown when the command line closes
    buf.cursor_position = len(buf.text)
