"""`morph doctor`: check this machine, morph's llama.cpp build, the model and the data dir."""

from __future__ import annotations

import click

from morph.cli.app import cli
from morph.errors import EXIT_ERROR


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--threads", type=click.IntRange(min=1), metavar="N", help="Threads for the test generation (default: config.toml's, else every core).")
@click.option("--timeout", type=click.FloatRange(min=1), default=180, show_default=True, metavar="S",
              help="Seconds the test generation may take.")
@click.option("--child", is_flag=True, hidden=True)
@click.pass_obj
def doctor_cmd(obj, as_json, threads, timeout, child):
    """Check what morph needs: the CPU's SIMD and AMX flags, the llama.cpp build and CPU
    backend, extra buffer types, the model file and its checksum, the data dir, earlier
    crash reports, and a short generation in a child process (a native crash there is
    reported, not fatal). Exits 1 when a check fails."""
    from morph import doctor

    if child:
        doctor.child(obj.model, threads)
        return
    checks = doctor.run(obj.model, threads, timeout)
    click.echo(doctor.as_json(checks) if as_json else doctor.as_text(checks))
    if not doctor.ok(checks):
        raise click.exceptions.Exit(EXIT_ERROR)
