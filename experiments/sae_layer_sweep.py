"""Layer sweep: which block should the SAE (and so every SAE feature) live at?

One corpus pass captures several candidate blocks at once; per block we train the same
SAE and measure
- reconstruction: held-out FVU, L0, dead share, and the KL of next-token distributions
  when the block's output is replaced by its SAE reconstruction (does the SAE keep what
  the model uses?);
- influence: KL(base || steered) of next-token distributions on neutral text when a
  unit direction (random, or an SAE decoder row) is added at 0.1 and 0.25 of the block's
  median residual norm (how strongly a feature there moves outputs);
- features: the formality and sentiment selection (held-out style shift at the default
  scale and the fluency cost), i.e. the quantity the named features are judged by.

    python -m experiments.sae_layer_sweep --layers 12 16 20 --tokens 100000 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from morph import fsutil, models, paths
from morph.sae.corpus import CorpusConfig, build_corpus, drop_outliers, load_prompts
from morph.sae.evidence import encode_corpus
from morph.sae.score import Item, kl, logprobs
from morph.sae.select import Scorer, select_axis
from morph.sae.train import SAEConfig, train_sae
from morph.steering import diffmean as dm


def neutral_items(engine, n: int = 12) -> list[Item]:
    """Held-out-like text: the first prompts of each genre, scored from their 2nd token."""
    seen, texts = set(), []
    for p in load_prompts()[::-1]:  # from the end: rotation gives every genre early
        if p["genre"] not in seen:
            seen.add(p["genre"])
            texts.append(p["text"])
        if len(texts) >= n:
            break
    return [Item(engine.tokenize(t)[:48], 1) for t in texts]


def influence(engine, runner, layer, norm, directions, items, scales=(0.1, 0.25)) -> dict:
    base = logprobs(runner, items, layer, full=True)
    out = {}
    for a in scales:
        kls = []
        for d in directions:
            v = (d / np.linalg.norm(d) * norm * a).astype(np.float32)
            steered = logprobs(runner, [Item(it.tokens, it.start, v) for it in items], layer, full=True)
            kls.append(float(np.mean([kl(b, s).mean() for b, s in zip(base, steered)])))
        out[str(a)] = round(float(np.mean(kls)), 4)
    return out


def splice_kl(engine, runner, layer, sae, items) -> float:
    base = logprobs(runner, items, layer, full=True)

    def recon(its, rows_of, acts):
        for it, (a, b) in zip(its, rows_of):
            # keep position 0 (the sink): the SAE never saw it
            acts[a + 1 : b] = sae.decode(*sae.encode(acts[a + 1 : b]))
        return acts

    spliced = logprobs(runner, items, layer, full=True, edit_extra=recon)
    return float(np.mean([kl(b, s).mean() for b, s in zip(base, spliced)]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 16, 20])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--corpus", default=None, help="reuse a saved corpus (.npz) with these layers")
    ap.add_argument("--axes", nargs="*", default=["formality", "sentiment"])
    ap.add_argument("--out", default="sweep.json")
    a = ap.parse_args(argv)

    from morph.engine.llama import LlamaEngine
    from morph.sae.build import pick_threads
    from morph.sae.corpus import Corpus

    info = models.check(models.resolve(a.model))
    engine = LlamaEngine(info, n_ctx=512, threads=a.threads or pick_threads())
    t = time.perf_counter()
    if a.corpus:
        corp = drop_outliers(Corpus.load(a.corpus))
    else:
        corp = build_corpus(engine, a.layers, CorpusConfig(tokens=a.tokens))
    report = {"model_id": info.model_id, "tokens": len(corp), "corpus": corp.stats,
              "corpus_s": round(time.perf_counter() - t, 1), "layers": {}}
    items = neutral_items(engine)
    rng = np.random.default_rng(0)
    rand_dirs = rng.standard_normal((4, info.n_embd)).astype(np.float32)
    recipes = {r: dm.load_recipe(paths.recipes_dir() / f"{r}.json") for r in a.axes}
    runner = engine.batch_runner(n_seq=32, n_ctx=4096, n_batch=512)
    for L in a.layers:
        t = time.perf_counter()
        x = corp.acts[L]
        norm = float(np.median(np.linalg.norm(x, axis=1)))
        sae = train_sae(x, SAEConfig(width=a.width, epochs=a.epochs), corp.groups())
        idx, val = encode_corpus(sae, x)
        freq = np.bincount(idx[val > 0].ravel(), minlength=sae.width) / len(x)
        dead = float((freq == 0).mean())
        top = np.argsort(-freq)[:4]
        row = {
            "residual_norm": round(norm, 2),
            "fvu": sae.meta["fvu"], "l0": sae.meta["l0"], "dead_share": round(dead, 4),
            "splice_kl": round(splice_kl(engine, runner, L, sae, items), 4),
            "influence_random": influence(engine, runner, L, norm, rand_dirs, items),
            "influence_latents": influence(engine, runner, L, norm, sae.W_dec[top], items),
            "features": {},
        }
        scorer = Scorer(engine, runner, L)
        for name, r in recipes.items():
            for p in select_axis(engine, sae, L, norm, r, scorer, full_sweep=True):
                row["features"][p.name] = {"latents": p.latents, "default_scale": p.default_scale,
                                           "shift": p.scores["style_shift_at_default"],
                                           "extra_nll": p.scores["extra_nll_at_default"],
                                           "effect_d": p.scores["activation_effect_d"],
                                           "sweep": p.scores["sweep"]}
        row["seconds"] = round(time.perf_counter() - t, 1)
        report["layers"][str(L)] = row
        print(json.dumps({L: {k: v for k, v in row.items() if k != "features"}}), flush=True)
        fsutil.atomic_write(a.out, json.dumps(report, indent=2).encode("utf-8"))
    runner.close()
    engine.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
