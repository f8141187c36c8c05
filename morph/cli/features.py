"""`morph features list|show|search|explain`: the catalog of named features for the current model."""

from __future__ import annotations

import json

import click

from morph.cli.app import cli
from morph.config import load_config
from morph.steering.catalog import Catalog


def _catalog(obj) -> Catalog:
    from morph.runtime import model_info

    info = model_info(obj.model or load_config().model, obj.gpu)  # --gpu: a Hugging Face folder too
    return Catalog(info.model_id)


def _row(f) -> str:
    return (f"{f.name:<12} {f.method:<9} L{f.layer:<3} scale {f.default_scale:<5g} {f.eval_label:<34} "
            f"{f.description}")


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
    """Details of one feature (NAME or NAME@METHOD), or of an SAE latent (ID or latent:ID)."""
    from morph.sae import evidence

    j = evidence.parse_latent(name)
    if j is not None:
        _show_latent(_catalog(obj), j, as_json)
        return
    f = _catalog(obj).get(name, experimental=True)  # showing is not steering: the refusal points here
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
        click.echo(f"  {k}: {json.dumps(v) if isinstance(v, (list, dict)) else v}")


@features_cmd.command("search")
@click.argument("query")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def search_cmd(obj, query, as_json):
    """Features whose name, description or explanation mention QUERY."""
    from morph.sae import evidence

    cat = _catalog(obj)
    hits = cat.search(query)
    found = evidence.find_evidence(cat.model_id)
    latents = []
    if found is not None:
        ev = found[0]
        latents = [evidence.latent_record(ev, j) for j in evidence.search_latents(ev, query)]
    if as_json:
        click.echo(json.dumps({"features": [f.to_json() for f in hits],
                               "latents": [{k: v for k, v in r.items() if k != "contexts"} for r in latents]},
                              indent=2))
        return
    for f in hits:
        click.echo(_row(f))
    for r in latents:
        label = r["explanation"] or ", ".join(json.dumps(t) for t in r["fires_on"])
        click.echo(f"latent:{r['latent']:<6} freq {r['frequency']:<9.2%} {label}")
    if not hits and not latents:
        click.echo(f"nothing matches {query!r}", err=True)


@features_cmd.command("explain")
@click.argument("name")
@click.option("--strengths", default=None, metavar="X,Y",
              help="Strengths to sweep, from 0 up: multiples of the insert block's median residual "
                   "norm [default: 0,1,2,3,4,6,8,12].")
@click.option("--save", is_flag=True,
              help="Store the sweep and explanation: in the feature's features.json entry "
                   "(scores.self_explanation) or the latent's evidence record.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def explain_cmd(obj, name, strengths, save, as_json):
    """Self-explain a feature (NAME or NAME@METHOD) or an SAE latent (ID or latent:ID), live:
    sweep the strength of its direction written into a placeholder word, pick the strength
    by the composite of self-similarity and first-token entropy, and answer at it."""
    from morph.config import load_config
    from morph.engine import load_engine
    from morph.errors import MorphError
    from morph.sae import interpret

    grid = interpret.STRENGTHS
    if strengths is not None:
        try:
            grid = tuple(float(x) for x in strengths.split(",") if x.strip())
        except ValueError:
            raise MorphError(f"--strengths takes numbers separated by commas, not {strengths!r}") from None
        interpret.check_strengths(grid)
    cat = _catalog(obj)
    target = interpret.resolve_target(cat, name)
    info = _catalog_info(obj)
    engine = load_engine(info, gpu=obj.gpu, n_ctx=512, threads=load_config().threads)
    try:
        probe, sw = interpret.explain_target(engine, target, grid)
    finally:
        engine.close()
    written = interpret.save(target, probe, sw) if save else None
    if as_json:
        click.echo(json.dumps({"target": target.label} | interpret.record(probe, sw), indent=2, ensure_ascii=False))
    else:
        click.echo(f"{target.label}: written at block {probe.insert_layer}, read at block {probe.read_layer}")
        click.echo(f"  {'strength':>8} {'self-sim':>9} {'entropy':>8} {'composite':>10}")
        for i, a in enumerate(sw.strengths):
            mark = "  <-" if i == sw.chosen else ""
            click.echo(f"  {a:>8g} {sw.self_similarity[i]:>+9.4f} {sw.entropy[i]:>8.3f} {sw.composite[i]:>10.5f}{mark}")
        note = " (no strength had a positive composite: the fixed strength)" if sw.fallback else ""
        click.echo(f"  strength {sw.strength:g}{note}: {sw.explanation or '(no answer)'}")
    if written:
        click.echo(f"morph: stored in {written}", err=True)


def _catalog_info(obj):
    from morph.runtime import model_info

    return model_info(obj.model or load_config().model, obj.gpu)


def _show_latent(cat: Catalog, j: int, as_json: bool) -> None:
    from morph.errors import MorphError
    from morph.sae import evidence

    found = evidence.find_evidence(cat.model_id)
    if found is None:
        raise MorphError(f"no SAE for {cat.model_id}; build one with `morph vectors build`")
    ev, sae, directory = found
    bold = ("\x1b[1m[", "]\x1b[0m") if not as_json and click.get_text_stream("stdout").isatty() else ("[[", "]]")
    rec = evidence.latent_record(ev, j, mark=bold)
    used = [f.key for f in cat.features if j in f.latents]
    rec |= {"layer": sae["layer"], "sae": str(directory / sae["file"]), "used_by": used}
    if as_json:
        click.echo(json.dumps(rec, indent=2, ensure_ascii=False))
        return
    click.echo(f"latent {j} of {directory / sae['file']} (layer {sae['layer']})")
    click.echo(f"  frequency {rec['frequency']:.3%} of {ev['n_tokens']} corpus tokens, "
               f"mean activation {rec['mean_activation']:g} when active")
    if rec["explanation"]:
        se = rec.get("self_explanation") or {}
        at = f" (strength {se['strength']:g})" if isinstance(se.get("strength"), (int, float)) else ""
        click.echo(f"  self-explanation{at}: {rec['explanation']}")
    click.echo(f"  fires most on: {', '.join(json.dumps(t, ensure_ascii=False) for t in rec['fires_on']) or '-'}")
    if used:
        click.echo(f"  used by: {', '.join(used)}")
    for c in rec["contexts"]:
        click.echo(f"  {c['activation']:>7.3f}  {c['text']}  ({c['genre']})")
