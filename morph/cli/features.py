"""`morph features list|show|search`: the catalog of named features for the current model."""

from __future__ import annotations

import json

import click

from morph import models
from morph.cli import cli
from morph.config import load_config
from morph.steering.catalog import Catalog


def _catalog(obj) -> Catalog:
    info = models.check(models.resolve(obj.model or load_config().model))
    return Catalog(info.model_id)


def _row(f) -> str:
    return f"{f.name:<12} {f.method:<9} L{f.layer:<3} scale {f.default_scale:<5g} {f.description}"


@cli.group("features", invoke_without_command=True)
@click.pass_context
def features_cmd(ctx):
    """The named features available for the current model."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@features_cmd.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_cmd(obj, as_json=False):
    """List features (name, method, layer, default scale, description)."""
    cat = _catalog(obj)
    if as_json:
        click.echo(json.dumps([f.to_json() | {"source": f.source} for f in cat.features], indent=2))
        return
    if not cat.features:
        click.echo(f"no features for {cat.model_id}; build some with `morph vectors build`", err=True)
    for f in cat.features:
        click.echo(_row(f))


@features_cmd.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def show_cmd(obj, name, as_json):
    """Details of one feature (NAME or NAME@METHOD)."""
    f = _catalog(obj).get(name)
    if as_json:
        click.echo(json.dumps(f.to_json() | {"source": f.source, "path": str(f.path)}, indent=2))
        return
    click.echo(_row(f))
    click.echo(f"  file: {f.path} ({f.source})")
    if f.latents:
        click.echo(f"  latents: {', '.join(map(str, f.latents))}")
    if f.explanation:
        click.echo(f"  explanation: {f.explanation}")
    for k, v in f.scores.items():
        click.echo(f"  {k}: {v}")


@features_cmd.command("search")
@click.argument("query")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def search_cmd(obj, query, as_json):
    """Features whose name, description or explanation mention QUERY."""
    hits = _catalog(obj).search(query)
    if as_json:
        click.echo(json.dumps([f.to_json() for f in hits], indent=2))
        return
    for f in hits:
        click.echo(_row(f))
