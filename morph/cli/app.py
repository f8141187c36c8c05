"""The `morph` click group, its global options and the one-line error rule.

Commands stay thin: parse, call into the modules that do the work, print. A MorphError
or a usage error (click's) anywhere becomes one `morph: error: ...` line on stderr and
the exit status in EXIT_STATUS; Ctrl-C exits 130.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import click

from morph import __version__, paths
from morph.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NEEDS_TERMINAL, MorphError

EXIT_STATUS = (
    "\b\nExit status: 0 done; "
    f"{EXIT_ERROR} an error (bad input or usage: one `morph: error: ...` line on stderr);\n"
    f"{EXIT_NEEDS_TERMINAL} the command needs a terminal (write, repl); {EXIT_INTERRUPTED} interrupted (Ctrl-C)."
)
_crash_reports = False  # set by main(); in-process callers (tests' CliRunner) keep their own faulthandler
# click >= 8.2 raises this for a group given no subcommand (`morph vectors`); 8.1 printed help
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class Ctx:
    """Global options, passed to subcommands via click's context object."""

    def __init__(self, model: str | None, gpu: bool, verbose: int, tensor_parallel_size: int | None = None):
        self.model = model
        self.gpu = gpu
        self.verbose = verbose
        self.tensor_parallel_size = tensor_parallel_size

    def runtime(self):
        from morph.runtime import open_runtime

        return open_runtime(self.model, gpu=self.gpu, tensor_parallel_size=self.tensor_parallel_size)


# Each subcommand's module, imported when the command is looked up (it registers itself
# on `cli`): `morph write` paints without first importing numpy, the server or the eval.
COMMANDS = {name: f"morph.cli.{mod}" for name, mod in (
    ("models", "models"), ("steer", "steer"), ("log", "log"), ("features", "features"),
    ("vectors", "vectors"), ("repl", "repl"), ("write", "write"), ("history", "history"),
    ("eval", "eval"), ("serve", "serve"), ("doctor", "doctor"))}


class MorphGroup(click.Group):
    """Parsing (make_context) and running (invoke, subcommands' parsing included) both end
    in one error line: click's multi-line "Usage: ... Error: ..." block never shows.
    Subcommands in COMMANDS load on first use."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx, name):
        if name not in self.commands and name in COMMANDS:
            importlib.import_module(COMMANDS[name])
        return super().get_command(ctx, name)

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_errors():
    try:
        yield
    except MorphError as e:
        _fail(str(e), e.exit_code)
    except _NO_ARGS_IS_HELP as e:  # a group alone prints its help, as `morph` alone does
        click.echo(e.ctx.get_help())
        raise click.exceptions.Exit(0) from None
    except click.ClickException as e:
        hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, click.UsageError) and e.ctx else ""
        _fail(e.format_message() + hint, EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


def _fail(message: str, code: int):
    line = " ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    click.echo(f"morph: error: {line}", err=True)
    raise click.exceptions.Exit(code) from None


@click.group(cls=MorphGroup, invoke_without_command=True, epilog=EXIT_STATUS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", metavar="PATH|NAME", help="GGUF model: a path, a name from `morph models`, or smollm2 (default).")
@click.option("--gpu", is_flag=True, help="Use the vLLM engine (needs morph[gpu]).")
@click.option("--tensor-parallel-size", "tensor_parallel_size", type=click.IntRange(min=1), metavar="N",
              help="With --gpu: split the model over N GPUs (vLLM tensor parallelism; config [gpu] tensor_parallel_size).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="MORPH_DATA_DIR", help="State directory (default: $XDG_DATA_HOME/tinymorph).")
@click.option("-v", "--verbose", count=True, help="Timings and details on stderr.")
@click.version_option(package_name="morph")
@click.pass_context
def cli(ctx, model, gpu, tensor_parallel_size, data_dir, verbose):
    """morph: steer how a local language model writes, with named features."""
    if data_dir:
        paths.set_data_dir(data_dir)
    if _crash_reports:
        _start_crash_report()
    ctx.obj = Ctx(model, gpu, verbose, tensor_parallel_size)
    if ctx.invoked_subcommand is None:
        repl = cli.get_command(ctx, "repl")
        if repl is not None and sys.stdin.isatty() and sys.stdout.isatty():
            ctx.invoke(repl)
        else:
            click.echo(ctx.get_help())


def _start_crash_report() -> None:
    """faulthandler into <data>/crash/ for this run; one line per earlier run that crashed."""
    from morph import crash
    from morph.engine.llamacpp import cpu_flags

    try:
        d = paths.data_dir()
    except OSError:
        return
    for r in crash.start(d, sys.argv[1:], {"morph": __version__, "cpu_flags": " ".join(sorted(cpu_flags()))}):
        click.echo(crash.announce(r), err=True)


def main() -> None:
    global _crash_reports
    _crash_reports = True
    cli(prog_name="morph")
