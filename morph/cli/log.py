"""`morph log`: recent runs from the history database."""

from __future__ import annotations

import datetime as dt
import json

import click

from morph import paths, store
from morph.cli.app import cli


def _short(s: str | None, n: int) -> str:
    s = " ".join((s or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


@cli.command("log")
@click.option("-n", "--count", default=10, show_default=True, help="How many runs.")
@click.option("--json", "as_json", is_flag=True, help="Full records as JSON.")
@click.option("--path", "show_path", is_flag=True, help="Print the database path and exit.")
def log_cmd(count, as_json, show_path):
    """Show recent runs (time, model, features, timings, input -> output)."""
    if show_path:
        click.echo(paths.db_path())
        return
    rows = []
    with store.safe("log") as box:
        if box:
            rows = [dict(r) for r in store.recent_runs(box[0], count)]
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for r in rows:
        when = dt.datetime.fromtimestamp(r["ts"]).strftime("%Y-%m-%d %H:%M:%S")
        feats = json.loads(r["features"] or "{}")
        f = ",".join(f"{k}={v}" if v is not None else k for k, v in feats.items()) or "-"
        ttft = f"{r['ttft_s'] * 1000:.0f}ms" if r["ttft_s"] is not None else "-"
        tps = f"{r['tok_per_s']:.0f}tok/s" if r["tok_per_s"] else "-"
        click.echo(f"#{r['id']} {when} {r['command']} {r['model']} [{f}] {r['mode'] or ''} {ttft} {tps}")
        click.echo(f"    {_short(r['input'], 60)!s} -> {_short(r['output'], 60)}")
