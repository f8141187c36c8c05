"""Slash commands: parsing, handlers, help text, and their prompt-toolkit completer.

Each command is one small handler taking the app (for output and the session) and its
arguments; a MorphError from a handler is printed as one line and the session goes on.
"""

from __future__ import annotations

import datetime as dt
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from morph import fsutil, tasks
from morph.errors import MorphError
from morph.repl import log as replog
from morph.steering import profile

KEYS_HELP = """\
keys: Enter sends; Alt-Enter (or Esc then Enter) inserts a newline; Up/Down and Ctrl-R
      search the input history; Right (or End) takes the grey history suggestion;
      Tab completes commands, features and modes; Ctrl-C stops a reply (at the prompt it
      clears the line); Ctrl-D on an empty line quits. vi keys by default (--emacs).
      Start a line with // to send a literal /."""


@dataclass
class Command:
    name: str
    usage: str
    help: str
    run: Callable[[object, list[str]], None]


COMMANDS: dict[str, Command] = {}


def command(name: str, usage: str, help: str):
    def deco(fn):
        COMMANDS[name] = Command(name, usage, help, fn)
        return fn
    return deco


def dispatch(app, line: str) -> None:
    """Run one slash command line (leading `/` included)."""
    try:
        parts = shlex.split(line[1:])
    except ValueError as e:
        raise MorphError(f"cannot parse {line!r}: {e}") from None
    if not parts:
        raise MorphError("empty command: /help lists them")
    name, args = parts[0].lower(), parts[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        near = [c for c in COMMANDS if c.startswith(name[:2])]
        hint = f" (did you mean {', '.join('/' + c for c in near)}?)" if near else ""
        raise MorphError(f"unknown command /{name}{hint}; /help lists them "
                         "(start a line with // to send text that begins with /)")
    cmd.run(app, args)


# --- the commands ---------------------------------------------------------------------


@command("feature", "/feature NAME[@METHOD] [SCALE|default|off], /feature off",
         "steer with a feature; SCALE is a fraction of the layer's residual norm "
         "(default: the feature's own); off removes it; /feature off removes all")
def _feature(app, args: list[str]) -> None:
    spec = profile.parse_words(args)
    s = app.session
    changed = s.features.apply(spec)
    if spec.off or spec.all_off:
        app.say(f"{', '.join(changed)} off" if changed else f"{spec.name or 'no feature'} was not active")
        return
    key = changed[0]
    f = s.catalog.get(key, experimental=True)
    app.say(f"{key} = {s.profile[key]:g} (block {f.layer}: {f.description})")


@command("features", "/features", "list the features of this model (* = active)")
def _features(app, args: list[str]) -> None:
    s = app.session
    if not s.catalog.features:
        app.say(f"no features for {s.catalog.model_id}; build some with `morph vectors build`")
        return
    for f in s.catalog.features:
        mark = f"* {s.profile[f.key]:<6g}" if f.key in s.profile else "        "
        exp = " (experimental)" if f.experimental else ""
        app.say(f"{mark}{f.key:<24} L{f.layer:<3} default {f.default_scale:<5g} {f.description}{exp}")


@command("mode", "/mode [chat|rewrite|continue]",
         "chat: a conversation; rewrite: each input rewritten; continue: the model continues your text")
def _mode(app, args: list[str]) -> None:
    if not args:
        app.say(f"mode: {app.session.mode} (choose: {', '.join(tasks.MODES)})")
        return
    if len(args) > 1:
        raise MorphError("usage: /mode chat|rewrite|continue")
    app.session.set_mode(args[0].lower())
    app.say(f"mode: {app.session.mode}")


@command("choose", "/choose [on|off]",
         "rewrite mode with features at their default strengths: on (the default) rewrites at "
         "several strengths and prints the strongest that keeps the meaning; off rewrites once")
def _choose(app, args: list[str]) -> None:
    s = app.session
    if args and (len(args) > 1 or args[0].lower() not in ("on", "off")):
        raise MorphError("usage: /choose on|off")
    if args:
        s.choose = args[0].lower() == "on"
    app.say(f"choose: {'on' if s.choose else 'off'}"
            + ("" if s.mode == "rewrite" else " (applies in rewrite mode)"))


@command("clear", "/clear", "forget the conversation so far (features and mode stay)")
def _clear(app, args: list[str]) -> None:
    app.session.clear()
    app.say("context cleared")


@command("model", "/model [NAME|PATH]", "show the model, or switch to another one (features re-checked)")
def _model(app, args: list[str]) -> None:
    if not args:
        e = app.session.engine
        app.say(f"model: {app.session.model_name} ({e.info.arch}, {e.info.n_layer} blocks, "
                f"context {e.n_ctx} tokens, engine {e.name}); features for {app.session.catalog.model_id}")
        return
    app.switch_model(args[0])


@command("save", "/save [--transcript] [--append] FILE",
         "write the last reply to FILE (replacing it); --transcript: the whole conversation "
         "as markdown; --append: add to the end of FILE. Written atomically.")
def _save(app, args: list[str]) -> None:
    transcript = append = False
    files = []
    for a in args:
        if a in ("--transcript", "-t"):
            transcript = True
        elif a in ("--append", "-a"):
            append = True
        elif a.startswith("-") and len(a) > 1:
            raise MorphError(f"/save: unknown option {a} (--transcript, --append)")
        else:
            files.append(a)
    if len(files) != 1:
        raise MorphError("usage: /save [--transcript] [--append] FILE")
    s = app.session
    text = s.transcript_text() if transcript else s.last_reply()
    if not text:
        raise MorphError("nothing to save yet")
    if not text.endswith("\n"):
        text += "\n"
    path = save_text(fsutil.user_path(files[0]), text, append)
    what = "transcript" if transcript else "last reply"
    app.say(f"{what} {'appended to' if append else 'written to'} {path} ({len(text)} chars)")


@command("history", "/history", "list recent logged sessions (resume one with `morph repl --resume ID`)")
def _history(app, args: list[str]) -> None:
    app.say_lines(format_sessions(replog.list_sessions(), current=getattr(app.session.log, "session_id", None)))


@command("help", "/help", "this help")
def _help(app, args: list[str]) -> None:
    lines = [f"{c.usage:<40} {c.help}" for c in COMMANDS.values()]
    app.say_lines(lines + ["", KEYS_HELP])


@command("quit", "/quit", "leave (as Ctrl-D)")
def _quit(app, args: list[str]) -> None:
    raise EOFError


# --- helpers --------------------------------------------------------------------------


def save_text(path: Path, text: str, append: bool) -> Path:
    """Write (or append) atomically: temp file in the same directory, fsync, rename.

    An append rewrites the whole file the same way, so a crash leaves the old file or the
    new one, never half of it. The file keeps its permissions.
    """
    path = path.absolute()
    if path.is_dir():
        raise MorphError(f"{path} is a directory")
    if not path.parent.is_dir():
        raise MorphError(f"{path.parent}: no such directory")
    old = b""
    mode = None
    if path.exists():
        st = path.stat()
        mode = st.st_mode & 0o7777
        if append:
            try:
                old = path.read_bytes()
            except OSError as e:
                raise MorphError(f"{path}: cannot read ({e.strerror})") from None
            if old and not old.endswith(b"\n"):
                old += b"\n"
    try:
        fsutil.atomic_write(path, old + text.encode("utf-8"), mode=mode)
    except OSError as e:
        raise MorphError(f"{path}: cannot write ({e.strerror})") from None
    return path


def format_sessions(sessions: Iterable[replog.SessionInfo], current: int | None = None) -> list[str]:
    out = []
    for s in sessions:
        when = dt.datetime.fromtimestamp(s.started).strftime("%Y-%m-%d %H:%M")
        feats = ",".join(f"{k}={v:g}" for k, v in s.features.items()) or "-"
        mark = "*" if s.id == current else " "
        out.append(f"{mark}#{s.id:<4} {when} {s.n_turns:>3} input{'s' if s.n_turns != 1 else ' '} {s.mode:<8} [{feats}] {s.title[:50]}")
    return out or ["no logged sessions yet"]


# --- completion -----------------------------------------------------------------------


class SlashCompleter(Completer):
    """Completes /commands, then their arguments: features, scales, modes, models, files."""

    def __init__(self, app):
        self.app = app
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        parts = text.split(" ")
        word = parts[-1]
        if len(parts) == 1:
            for name, c in COMMANDS.items():
                if name.startswith(word[1:].lower()):
                    yield Completion("/" + name, -len(word), display_meta=c.help[:50])
            return
        cmd, idx = parts[0][1:].lower(), len([p for p in parts[1:-1] if p])
        for cand, meta in self._args(cmd, idx, parts):
            if cand.startswith(word):
                yield Completion(cand, -len(word), display_meta=meta)
        if cmd == "save" and not word.startswith("-"):
            yield from self.paths.get_completions(Document(word, len(word)), complete_event)

    def _args(self, cmd: str, idx: int, parts: list[str]) -> list[tuple[str, str]]:
        s = self.app.session
        if cmd == "feature" and idx == 0:
            names: dict[str, str] = {}
            for f in s.catalog.features:  # a bare name picks the preferred method
                names.setdefault(f.name, f.description[:40])
            return list(names.items()) + [(f.key, f.method) for f in s.catalog.features]
        if cmd == "feature" and idx == 1:
            try:
                d = s.catalog.get(parts[1]).default_scale
            except MorphError:
                return [("off", "remove")]
            return [("off", "remove"), (f"{d:g}", "default"), ("default", f"{d:g}")]
        if cmd == "mode" and idx == 0:
            return [(m, "") for m in tasks.MODES]
        if cmd == "choose" and idx == 0:
            return [("on", "choose among a ladder"), ("off", "rewrite once")]
        if cmd == "model" and idx == 0:
            from morph import models

            return [(m.name, m.source) for m in models.available()]
        if cmd == "save":
            return [("--transcript", "whole conversation"), ("--append", "add to the end")]
        return []
