"""`morph history FILE`: the versions `morph write` saved; `--restore N` prints or writes one."""

from __future__ import annotations

import sys
import time

import click

from morph import store
from morph.cli.app import cli
from morph.errors import MorphError
from morph.fsutil import user_path


@cli.command("history")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--restore", "restore", type=int, metavar="N", help="Print version N (see the list).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="With --restore: write it to this file (atomically) instead.")
def history_cmd(file, restore, output):
    """List the saved versions of FILE, or restore one.

    \b
      morph history notes.md
      morph history notes.md --restore 3 > old.md
      morph history notes.md --restore 3 -o notes.md
    """
    from morph.editor import history
    from morph.editor.buffer import atomic_write

    path = user_path(file).absolute()
    if output and restore is None:
        raise MorphError("-o needs --restore N")
    try:
        db = store.connect()
    except Exception as e:
        raise MorphError(f"cannot open the history database: {e}") from None
    try:
        versions = history.list_versions(db, path)
    finally:
        db.close()
    if not versions:
        raise MorphError(f"no saved versions of {path} (versions are recorded when morph write saves)")
    if restore is None:
        for v in versions:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["ts"]))
            text = v["content"]
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            click.echo(f"{v['n']:>4}  {when}  {len(text.split()):>6} words  {v['sha256'][:10]}  {first[:50]}")
        return
    match = [v for v in versions if v["n"] == restore]
    if not match:
        raise MorphError(f"no version {restore} of {path} (there are {len(versions)})")
    content = match[0]["content"]
    if output:
        out = user_path(output).absolute()
        try:
            atomic_write(out, content.encode("utf-8"))
        except OSError as e:
            raise MorphError(f"{out}: cannot write ({e.strerror})") from None
        click.echo(f"version {restore} written to {out}", err=True)
    else:
        sys.stdout.write(content)
        sys.stdout.flush()
