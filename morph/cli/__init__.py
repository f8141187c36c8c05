"""The `morph` command: a click group; each subcommand lives in its own small module.

Commands stay thin: parse, call into the modules that do the work, print. A MorphError
anywhere becomes one line on stderr and exit code 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import sys

import click

from morph import paths
from morph.errors import MorphError


class Ctx:
    """Global options, passed to subcommands via click's context object."""

    def __init__(self, model: str | None, gpu: bool, verbose: int):
        self.model = model
        self.gpu = gpu
        self.verbose = verbose

    def runtime(self):
        from morph.runtime import open_runtime

        return open_runtime(self.model, gpu=self.gpu)


class MorphGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MorphError as e:
            click.echo(f"morph: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)


@click.group(cls=MorphGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", metavar="PATH|NAME", help="GGUF model: a path, a name from `morph models`, or smollm2 (default).")
@click.option("--gpu", is_flag=True, help="Use the vLLM engine (needs morph[gpu]).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="MORPH_DATA_DIR", help="State directory (default: $XDG_DATA_HOME/tinymorph).")
@click.option("-v", "--verbose", count=True, help="Timings and details on stderr.")
@click.version_option(package_name="morph")
@click.pass_context
def cli(ctx, model, gpu, data_dir, verbose):
    """morph: steer how a local language model writes, with named features."""
    if data_dir:
        paths.set_data_dir(data_dir)
    ctx.obj = Ctx(model, gpu, verbose)
    if ctx.invoked_subcommand is None:
        repl = cli.commands.get("repl")
        if repl is not None and sys.stdin.isatty() and sys.stdout.isatty():
            ctx.invoke(repl)
        else:
            click.echo(ctx.get_help())


def main() -> None:
    cli(prog_name="morph")


# Subcommands register themselves on `cli` when imported.
from morph.cli import models as _models  # noqa: E402,F401
from morph.cli import steer as _steer  # noqa: E402,F401
from morph.cli import log as _log  # noqa: E402,F401
from morph.cli import features as _features  # noqa: E402,F401
from morph.cli import vectors as _vectors  # noqa: E402,F401
from morph.cli import repl as _repl  # noqa: E402,F401
from morph.cli import write as _write  # noqa: E402,F401
from morph.cli import history as _history  # noqa: E402,F401
from morph.cli import serve as _serve  # noqa: E402,F401
