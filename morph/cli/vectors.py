"""`morph vectors ...`: build control vectors (diffmean now; the SAE pipeline later)."""

from __future__ import annotations

import click

from morph.cli.app import cli


@cli.group("vectors")
def vectors_cmd():
    """Build and inspect control vectors."""


@vectors_cmd.command("diffmean")
@click.argument("recipes", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--layer", type=int, default=16, show_default=True, help="Block whose output is steered.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: the data dir's vectors/<model-id>/).")
@click.option("--budget", type=float, default=None, help="Fluency budget, extra nats/token on neutral text.")
@click.option("--gpu", "gpu", is_flag=True, help="Capture and score through the vLLM engine (as the global --gpu).")
@click.pass_obj
def diffmean_cmd(obj, recipes, layer, out_dir, budget, gpu):
    """Difference-of-means vectors from contrast sets (default: all shipped recipes).

    For each recipe both poles are written as <name>.diffmean.gguf with a features.json
    entry; the default scale is measured on held-out pairs (report: diffmean.json).
    """
    import json
    from pathlib import Path

    from morph import fsutil, paths
    from morph.steering import diffmean as dm
    from morph.steering.catalog import write_entries

    files = [Path(r) for r in recipes] or sorted(paths.recipes_dir().glob("*.json"))
    if not files:
        raise click.ClickException("no recipes given and none shipped")
    loaded = [dm.load_recipe(f) for f in files]
    obj.gpu = obj.gpu or gpu
    rt = obj.runtime()
    try:
        if not 1 <= layer < rt.info.n_layer:
            raise click.BadParameter(f"must be within 1..{rt.info.n_layer - 1}", param_hint="--layer")
        target = Path(out_dir) if out_dir else paths.user_vectors_dir() / rt.info.model_id
        reports = []
        kw = {} if budget is None else {"budget": budget}
        for recipe in loaded:
            click.echo(f"{recipe.axis}: {len(recipe.pairs)} pairs, layer {layer}", err=True)
            pairs, report = dm.build_recipe(
                rt.engine, recipe, layer, rt.info.hint, rt.info.fingerprint,
                progress=lambda axis, row: click.echo(f"  {axis} {row}", err=True), **kw)
            for feat, cv in pairs:
                cv.save(target / feat.file)
            write_entries(target, [f for f, _ in pairs], rt.info.model_id)
            reports.append(report)
            for feat, _ in pairs:
                click.echo(f"{feat.name:<12} default scale {feat.default_scale:<5} "
                           f"shift {feat.scores['style_shift_at_default']:+.3f} "
                           f"extra NLL {feat.scores['extra_nll_at_default']:.3f}")
        rep = target / "diffmean.json"
        old = json.loads(rep.read_text()) if rep.exists() else {}
        old.update({r["axis"]: r for r in reports})
        fsutil.write_json(rep, old)
        click.echo(f"wrote {len(reports) * 2} vectors to {target}", err=True)
    finally:
        rt.close()


@vectors_cmd.command("build")
@click.option("--model", "-m", "model_spec", metavar="PATH|NAME", default=None,
              help="Model to build for (default: the global --model or the configured one).")
@click.option("--layer", type=int, default=None, help="SAE layer (default: the measured one, or ~53% depth).")
@click.option("--width", type=click.IntRange(64, None), default=4096, show_default=True, help="SAE latents.")
@click.option("--tokens", type=click.IntRange(4096, None), default=305_000, show_default=True,
              help="Activation tokens to collect (prompts + the model's continuations).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--k", "k", type=click.IntRange(1, None), default=32, show_default=True, help="Active latents per token.")
@click.option("--epochs", type=click.FloatRange(0.05, None), default=3.0, show_default=True,
              help="Passes over the corpus (3: held-out FVU 0.177 on the shipped text, README).")
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="llama.cpp threads (default: all cores, or 1 when the machine is busy).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: the data dir's vectors/<model-id>/).")
@click.option("--corpus", "corpus_cache", type=click.Path(dir_okay=False), default=None,
              help="Corpus cache (.npz): reused when it matches model, layer, seed, size and text, else written.")
@click.option("--text", "text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Generated text to read before generating more (`morph vectors corpus`; default: the "
                   "text shipped for the model, if any).")
@click.option("--no-text", "no_text", is_flag=True, help="Generate all of the corpus, reading no stored text.")
@click.option("--recipe", "recipes", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Contrast-set recipe(s) to name features from (default: every shipped recipe).")
@click.option("--direction", default="latents", show_default=True, metavar="latents|proj:M|blend:A",
              help="Feature direction: the picked latents, the recipe's diffmean projected onto the "
                   "pole's top-M latents, or a blend A*latents+(1-A)*diffmean.")
@click.option("--gpu", "gpu", is_flag=True,
              help="Capture, generate and score through the vLLM engine (as the global --gpu); same files.")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
@click.pass_obj
def build_cmd(obj, model_spec, layer, width, tokens, seed, k, epochs, threads, out_dir, corpus_cache, text, no_text,
              recipes, direction, gpu, as_json):
    """The SAE pipeline: corpus, sparse autoencoder, latent evidence, named features.

    \b
      morph vectors build                      # the default model, ~23 min on 2 cores
      morph vectors build --model gemma-3-270m.gguf --tokens 200000
      morph vectors build --gpu --model ~/hf/Llama-3.2-1B-Instruct   # vLLM; a GGUF or HF folder
    """
    import json
    from pathlib import Path

    from morph.config import load_config
    from morph.runtime import model_info
    from morph.sae.build import BuildConfig, build
    from morph.sae.combine import parse as parse_direction

    if k > width:
        raise click.BadParameter("must not exceed --width", param_hint="--k")
    if text and no_text:
        raise click.BadParameter("reads a text file, --no-text reads none: give one", param_hint="--text")
    parse_direction(direction)  # a bad spec fails before the model loads
    gpu = gpu or obj.gpu
    conf = load_config()
    info = model_info(model_spec or obj.model or conf.model, gpu)
    if layer is not None and not 1 <= layer < info.n_layer:
        raise click.BadParameter(f"must be within 1..{info.n_layer - 1} for {info.model_id}", param_hint="--layer")
    cfg = BuildConfig(layer=layer, width=width, k=k, tokens=tokens, seed=seed, epochs=epochs, threads=threads,
                      corpus_cache=Path(corpus_cache) if corpus_cache else None,
                      text=Path(text) if text else None, use_text=not no_text,
                      recipes=[Path(r) for r in recipes] or None, gpu=gpu, direction=direction,
                      tensor_parallel_size=obj.tensor_parallel_size or conf.tensor_parallel_size)
    bars = _Bars()
    try:
        report = build(info, cfg, Path(out_dir) if out_dir else None, progress=bars.stage,
                       log=lambda s: bars.write(f"morph: {s}"))
    finally:
        bars.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    s, t = report["sae"], report["timings"]
    click.echo(f"{info.model_id}: SAE layer {s['layer']}, width {s['width']}, k {s['k']}: "
               f"FVU {s['fvu']:.3f} (held out), L0 {s['l0']:.1f}, dead {s['dead_share']:.1%}, "
               f"{s['train_tokens']} training tokens")
    for f in report["features"]:
        sc = f["scores"]
        click.echo(f"  {f['name']:<11} latents {','.join(map(str, f['latents'])):<16} scale {f['default_scale']:<5} "
                   f"shift {sc['style_shift_at_default']:+.3f} extra NLL {sc['extra_nll_at_default']:.3f} "
                   f"wins {sc['heldout_wins_at_default']}")
    for f in report.get("rejected", []):
        sc = f["scores"]
        click.echo(f"  {f['name']:<11} not written: shift {sc['style_shift_at_default']:+.3f} extra NLL "
                   f"{sc['extra_nll_at_default']:.3f} wins {sc['heldout_wins_at_default']} (needs a majority)")
    stages = ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items() if k.endswith("_s") and k != "total_s")
    click.echo(f"time {t['total_s'] / 60:.1f} min ({stages})" + (" (corpus reused)" if t.get("corpus_reused") else ""))
    out = Path(out_dir) if out_dir else None
    click.echo(f"wrote {out or 'the data dir'}: {s['file']}, {s['evidence']}, "
               f"{len(report['features'])} feature vectors, features.json, build.json", err=True)


@vectors_cmd.command("corpus")
@click.option("--model", "-m", "model_spec", metavar="PATH|NAME", default=None,
              help="Model whose text to generate (default: the global --model or the configured one).")
@click.option("--tokens", type=click.IntRange(1000, None), default=260_000, show_default=True,
              help="Tokens to generate, openings included.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="llama.cpp threads (default: all cores, or 1 when the machine is busy).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True,
              help="Where to write the text (.jsonl.gz); `vectors build --text` reads it.")
@click.pass_obj
def corpus_cmd(obj, model_spec, tokens, seed, threads, out_file):
    """Generate corpus text once, for builds that only read it.

    The model continues morph's corpus openings (the same sampling as `vectors build`);
    the text is stored, not activations, so a build reads it in any framing and at any
    layer. The default model's text ships with morph.

    \b
      morph vectors corpus --out smol.jsonl.gz     # 260k tokens, ~25 min on 2 cores
      morph vectors build --text smol.jsonl.gz
    """
    from pathlib import Path

    from morph.config import load_config
    from morph.engine import load_engine
    from morph.runtime import model_info
    from morph.sae import corpus as corpus_mod
    from morph.sae.build import pick_threads

    info = model_info(model_spec or obj.model or load_config().model, False)
    out = Path(out_file)
    if out.exists() and out.is_dir():
        raise click.BadParameter("is a folder", param_hint="--out")
    engine = load_engine(info, gpu=False, n_ctx=512, threads=threads or pick_threads())
    bars = _Bars()
    try:
        cfg = corpus_mod.CorpusConfig(tokens=tokens, seed=seed, reframe=0.0)
        docs, stops = corpus_mod.generate_text(engine, cfg, progress=bars.stage("generate", tokens))
    finally:
        bars.close()
        engine.close()
    meta = {"model_id": info.model_id, "model_fingerprint": info.fingerprint, "seed": seed, "tokens": tokens,
            "documents": len(docs), "stops": stops,
            "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                         "max_new": cfg.max_new}}
    corpus_mod.save_text(out, docs, meta)
    click.echo(f"wrote {len(docs)} documents to {out}", err=True)


class _Bars:
    """One tqdm bar per pipeline stage on stderr."""

    def __init__(self):
        self.bar = None

    def stage(self, name, total):
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=f"{name:<9}", unit="tok" if name in ("corpus", "evidence", "generate") else "it",
                        unit_scale=name in ("corpus", "evidence", "generate"), leave=True, dynamic_ncols=True)
        return self.bar.update

    def write(self, msg):
        from tqdm import tqdm

        tqdm.write(msg, file=__import__("sys").stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
