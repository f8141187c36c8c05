"""`morph repl`: an interactive loop for quick steered drafting (see morph/repl/)."""

from __future__ import annotations

import sys

import click
from click.core import ParameterSource

from morph import tasks
from morph.cli.app import cli
from morph.cli.options import feature_option, sampling_options
from morph.errors import MorphError, NeedsTerminal
from morph.steering import profile

NOT_A_TTY = ("`morph repl` needs a terminal on stdin; for piped text use "
             "`morph steer` (e.g. `echo hi | morph steer -f formal`)")


@cli.command("repl")
@feature_option("Feature to start with (repeatable); change them with /feature.")
@click.option("--mode", type=click.Choice(tasks.MODES), default="chat", show_default=True,
              help="chat: a conversation; rewrite: each input rewritten; continue: raw continuation.")
@click.option("--max-tokens", type=click.IntRange(1, None), default=256, show_default=True,
              help="Longest reply in tokens.")
@sampling_options
@click.option("--emacs", is_flag=True, help="Emacs keys (default: vi, or `keys` in config.toml's [editor]).")
@click.option("--resume", "resume", is_flag=False, flag_value="last", default=None, metavar="[ID]",
              help="Continue the last logged session, or session ID.")
@click.option("--list", "list_sessions", is_flag=True, help="List logged sessions and exit.")
@click.option("--no-log", is_flag=True, help="Do not record this session in morph.db.")
@click.pass_obj
def repl_cmd(obj, features=(), mode="chat", max_tokens=256, temperature=None, top_p=None, seed=None,
             repeat_penalty=None, apply=None, experimental=False, emacs=False, resume=None,
             list_sessions=False, no_log=False):
    """Chat with the model, steering it with features as you go.

    \b
    Enter sends; Alt-Enter (Esc Enter) inserts a newline; Ctrl-C stops a reply;
    Ctrl-D quits. /help lists the slash commands (/feature, /mode, /save, ...).
    """
    from morph.repl import log as replog
    from morph.repl.commands import format_sessions

    if list_sessions:
        for line in format_sessions(replog.list_sessions(50)):
            click.echo(line)
        return
    if not sys.stdin.isatty():
        raise NeedsTerminal(NOT_A_TTY)
    resume_id = None
    if resume not in (None, "last"):
        try:
            resume_id = int(resume.lstrip("#"))
        except ValueError:
            raise MorphError(f"--resume takes a session number (see `morph repl --list`), not {resume!r}") from None
    specs = [profile.parse(f) for f in features]  # bad specs fail before the model loads
    rt = obj.runtime()
    from morph.repl.app import Repl

    start = {} if features or resume is not None else dict(rt.config.features)
    keys = "emacs" if emacs else rt.config.editor_keys
    mode_given = click.get_current_context().get_parameter_source("mode") == ParameterSource.COMMANDLINE
    app = None
    try:
        sampling = dict(temperature=temperature, top_p=top_p, seed=seed, repeat_penalty=repeat_penalty,
                        apply=apply)
        app = Repl(rt, keys=keys, mode=mode, features=start, max_tokens=max_tokens, sampling=sampling,
                   experimental=experimental, log=not no_log, verbose=obj.verbose,
                   open_runtime=lambda spec: _open(obj, spec))
        if resume is not None:
            app.resume(resume_id)
            if mode_given:
                app.session.set_mode(mode)
        for spec in specs:  # -f (also with --resume, where it wins over the log)
            app.session.features.apply(spec)
        app.run()
    finally:
        (app.rt if app is not None else rt).close()


def _open(obj, spec: str):
    from morph.runtime import open_runtime

    return open_runtime(spec, gpu=obj.gpu, tensor_parallel_size=obj.tensor_parallel_size)
