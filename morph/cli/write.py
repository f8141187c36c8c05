"""`morph write FILE`: the full-screen editor with streamed, steerable ghost text."""

from __future__ import annotations

import sys

import click

from morph.cli.app import cli
from morph.cli.options import feature_option
from morph.errors import NeedsTerminal
from morph.fsutil import user_path
from morph.steering import profile


@cli.command("write")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--emacs", "keys", flag_value="emacs", help="Emacs keys instead of vi.")
@click.option("--vi", "keys", flag_value="vi", help="vi keys (the default unless config says otherwise).")
@feature_option("Steer suggestions with a feature (repeatable); replaces the document's stored profile.")
@click.option("--experimental", is_flag=True, help="Allow features marked experimental.")
@click.option("--no-suggest", is_flag=True, help="Edit without loading the model (no ghost text).")
@click.option("--no-log", is_flag=True, help="Keep no versions, suggestion log or profile in morph.db.")
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="CPU threads for generation (default: config `threads`, else all cores but one).")
@click.pass_obj
def write_cmd(obj, file, keys, features, experimental, no_suggest, no_log, threads):
    """Edit FILE (created on first save) with ghost-text suggestions from the local model.

    \b
    vi keys by default: i to insert, Esc for normal mode, :w :wq :q! as usual.
    Ghost text: Tab accepts, Ctrl-Right the next word, Ctrl-E the next line, Ctrl-] dismisses.
    F2 opens the feature panel; :feature NAME SCALE steers from the command line.
    K explains the word under the cursor; \\e \\c expand / compress the sentence.
    """
    from morph.config import load_config
    from morph.editor import Editor
    from morph.editor.buffer import read_text

    # Refuse unusable files before loading anything (non-UTF-8: one line, exit 1, untouched).
    read_text(user_path(file).absolute())
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise NeedsTerminal("morph write needs a terminal (for pipes use `morph steer`)")
    for spec in features:  # bad specs fail before the model loads
        profile.parse(spec)
    cfg = load_config()
    # The model loads on a thread after the first paint (Editor's loader): the document is on
    # screen in the time Python takes to import the editor, whatever the model.
    # vLLM (--gpu) starts in the main thread, before the editor, as it always did.
    opened: list = []

    def loader():
        rt = _editor_runtime(obj, threads, cfg)
        opened.append(rt)
        return rt.engine, rt.catalog, rt.model_name

    now = None if no_suggest or not obj.gpu else loader()
    ed = None
    try:
        ed = Editor(
            file,
            engine=now and now[0],
            catalog=now and now[1],
            config=cfg,
            model_name=now[2] if now else "no model",
            keys=keys,
            profile=list(features) if features else None,
            experimental=experimental,
            log=not no_log,
            embedder=lambda: opened[0].embedder if opened else None,
            loader=None if no_suggest or now else loader,
        )
        ed.run(manage_gc=True)
    finally:
        if ed is not None:
            ed.wait_loaded()
        for rt in opened:  # also when the editor could not open (the --gpu engine loads first)
            rt.close()


def editor_threads(configured: int | None, cores: int) -> int:
    """All cores but one, so the UI thread always has a core: on a shared 2-core machine
    two generation threads stall each other behind any neighbour (bench/editor.py and the
    report: TTFT 40-4,500 ms with 2 threads vs 18-33 ms with 1 under the same load)."""
    return configured if configured else max(1, cores - 1)


def _editor_runtime(obj, threads: int | None, cfg):
    from morph.engine import load_engine
    from morph.engine.llamacpp import default_threads
    from morph.runtime import Runtime, model_info
    from morph.steering.catalog import Catalog

    info = model_info(obj.model or cfg.model, obj.gpu)
    n = editor_threads(threads or cfg.threads, default_threads())
    engine = load_engine(info, gpu=obj.gpu, n_ctx=cfg.n_ctx, threads=n,
                         tensor_parallel_size=obj.tensor_parallel_size or cfg.tensor_parallel_size,
                         compile=cfg.gpu_compile, slots=2)
    return Runtime(cfg, info, engine, Catalog(info.model_id))

