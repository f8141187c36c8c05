"""`morph write FILE`: the full-screen editor with streamed, steerable ghost text."""

from __future__ import annotations

import sys
import threading

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
    # Markdown highlighting's pygments modules take ~0.1 s to import: overlap that with the
    # model load (C code, the GIL released) instead of adding it to the first paint.
    threading.Thread(target=_preload_lexer, daemon=True).start()
    rt = None
    if no_suggest:
        cfg = load_config()
        engine = catalog = None
        model_name = "no model"
    else:
        rt = _editor_runtime(obj, threads)
        cfg, engine, catalog, model_name = rt.config, rt.engine, rt.catalog, rt.model_name
    try:
        ed = Editor(
            file,
            engine=engine,
            catalog=catalog,
            config=cfg,
            model_name=model_name,
            keys=keys,
            profile=list(features) if features else None,
            experimental=experimental,
            log=not no_log,
            embedder=(lambda: rt.embedder) if rt is not None else None,
        )
        ed.run(manage_gc=True)
    finally:
        if rt is not None:
            rt.close()


def _preload_lexer() -> None:
    try:
        import pygments.lexers.markup  # noqa: F401
    except ImportError:
        pass


def editor_threads(configured: int | None, cores: int) -> int:
    """All cores but one, so the UI thread always has a core: on a shared 2-core machine
    two generation threads stall each other behind any neighbour (bench/editor.py and the
    report: TTFT 40-4,500 ms with 2 threads vs 18-33 ms with 1 under the same load)."""
    return configured if configured else max(1, cores - 1)


def _editor_runtime(obj, threads: int | None):
    from morph.config import load_config
    from morph.engine import load_engine
    from morph.engine.llamacpp import default_threads
    from morph.runtime import Runtime, model_info
    from morph.steering.catalog import Catalog

    cfg = load_config()
    info = model_info(obj.model or cfg.model, obj.gpu)
    n = editor_threads(threads or cfg.threads, default_threads())
    engine = load_engine(info, gpu=obj.gpu, n_ctx=cfg.n_ctx, threads=n,
                         tensor_parallel_size=obj.tensor_parallel_size or cfg.tensor_parallel_size,
                         compile=cfg.gpu_compile, slots=2)
    return Runtime(cfg, info, engine, Catalog(info.model_id))

