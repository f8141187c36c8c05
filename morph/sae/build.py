"""`morph vectors build`: corpus -> SAE -> evidence -> named features, for one model.

Outputs (in `<data dir>/vectors/<model-id>/`, the layout of the shipped `vectors/`):
`sae-L<layer>.gguf`, `sae-L<layer>.evidence.json.gz`, `<name>.gguf` per named feature,
entries in `features.json` (merged: diffmean entries stay), and `build.json`, the record
of this run (corpus make-up, SAE scores, per-feature sweeps, stage timings).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from morph import fsutil, paths
from morph.errors import MorphError
from morph.models import ModelInfo
from morph.sae import corpus as corpus_mod
from morph.sae import evidence as ev_mod
from morph.sae.train import SAEConfig, train_sae

# Default SAE layer per model id, from a measured sweep (see vectors/<model>/README.md);
# other models get the same relative depth.
SWEPT_LAYERS = {"smollm2-135m-instruct": 16}
RELATIVE_DEPTH = 16 / 30


def default_layer(info: ModelInfo) -> int:
    if info.model_id in SWEPT_LAYERS:
        return SWEPT_LAYERS[info.model_id]
    return max(1, min(info.n_layer - 2, round(RELATIVE_DEPTH * info.n_layer)))


def pick_threads() -> int:
    """All cores unless the machine is crowded. Two llama.cpp threads meet at ~1,000
    barriers per step: measured on 2 cores, 137 vs 108 tok/s (2 vs 1 thread) at load 2.3,
    but 2.6 vs 87 tok/s at load 10, when the other thread is rarely scheduled."""
    from morph.engine.llamacpp import default_threads

    n = default_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:
        return n
    return 1 if load >= 2 * n else n


@dataclass
class BuildConfig:
    layer: int | None = None
    width: int = 4096
    k: int = 32
    tokens: int = 305_000
    seed: int = 0
    epochs: float = 3.0  # measured: FVU 0.177 with the shipped text (vectors/<model>/SAE_VARIANTS.md)
    threads: int | None = None
    n_seq: int = 32
    recipes: list[Path] | None = None  # default: every shipped recipe
    corpus_cache: Path | None = None  # load the corpus from here if it fits, else save it there
    # Generated text read before generating more (corpus.capture_text): this file, else the
    # text shipped for the model (morph/data/corpus/text/<model-id>.jsonl.gz) if any.
    text: Path | None = None
    use_text: bool = True
    direction: str = "latents"  # latents | proj:M | blend:A (combine.py)
    gpu: bool = False  # capture, generation and scoring through the vLLM engine (same files)
    tensor_parallel_size: int = 1  # with gpu: vLLM's tensor parallelism


Progress = Callable[[str, int | None], Callable[[int], None]]  # (stage, total) -> advance


def build(info: ModelInfo, cfg: BuildConfig, out_dir: Path | None = None,
          progress: Progress | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    from morph.engine import load_engine
    from morph.steering import diffmean as dm

    layer = default_layer(info) if cfg.layer is None else cfg.layer
    if not 1 <= layer < info.n_layer:
        raise MorphError(f"--layer must be within 1..{info.n_layer - 1} for {info.model_id}")
    out_dir = Path(out_dir) if out_dir else paths.user_vectors_dir() / info.model_id
    recipes = [dm.load_recipe(p) for p in (cfg.recipes or sorted(paths.recipes_dir().glob("*.json")))]
    if not recipes:
        raise MorphError(f"no contrast-set recipes in {paths.recipes_dir()}")
    threads = None if cfg.gpu else cfg.threads or pick_threads()
    bar = progress or (lambda stage, total: (lambda n: None))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    # llama.cpp: n_ctx is the capture context (batch runners size their own); vLLM: the
    # longest sequence any stage runs (a corpus job is at most ~500 tokens).
    engine = load_engine(info, gpu=cfg.gpu, n_ctx=2048 if cfg.gpu else 512, threads=threads,
                         tensor_parallel_size=cfg.tensor_parallel_size)
    try:
        with _timed(timings, "corpus_s"):
            corp = _corpus(engine, info, cfg, layer, bar, log, timings)
        x = corp.acts[layer]
        residual_norm = float(np.median(np.linalg.norm(x, axis=1)))
        log(f"corpus: {len(corp)} tokens ({corp.stats['generated_rows']} generated) from "
            f"{corp.stats['documents']} documents in {timings['corpus_s']} s")
        with _timed(timings, "train_s"):
            sae = _train(x, corp, cfg, bar)
        with _timed(timings, "evidence_s"):
            ev, dead = _evidence(engine, sae, x, corp, bar)
        sae.meta.update({
            "layer": layer, "model_id": info.model_id, "model_fingerprint": info.fingerprint,
            "seed": cfg.seed, "dead_share": round(dead, 5), "residual_norm": round(residual_norm, 4),
            "corpus": corp.stats,
        })
        log(f"SAE L{layer}: width {sae.width}, k {sae.k}, FVU {sae.meta['fvu']} (held out), "
            f"L0 {sae.meta['l0']}, dead {dead:.1%}, {timings['train_s']} s")
        del corp
        with _timed(timings, "select_s"):
            picks = _select(engine, sae, layer, residual_norm, recipes, bar, cfg.direction)
        with _timed(timings, "explain_s"):
            _explain(engine, sae, picks, ev, layer, bar)
        sae_info, kept, rejected, feats = _write(out_dir, info, sae, ev, picks, layer, residual_norm, dead, log)
        timings["total_s"] = round(time.perf_counter() - t_all, 1)
        report = {
            "model_id": info.model_id, "model_fingerprint": info.fingerprint, "threads": threads,
            "engine": engine.name,
            "config": {k: (Path(v).name if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                       if k != "recipes"},
            "sae": sae_info, "sae_training": {k: v for k, v in sae.meta.items() if k != "corpus"},
            "corpus": sae.meta["corpus"], "timings": timings,
            "features": [{"name": p.name, "axis": p.axis, "latents": p.latents, "weights": p.weights,
                          "default_scale": p.default_scale, "scores": p.scores, "candidates": p.candidates,
                          "explanation": f.explanation} for p, f in zip(kept, feats)],
            "rejected": [{"name": p.name, "axis": p.axis, "latents": p.latents, "scores": p.scores,
                          "candidates": p.candidates} for p in rejected],
        }
        fsutil.atomic_write(out_dir / "build.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        return report
    finally:
        engine.close()


@contextlib.contextmanager
def _timed(timings: dict, key: str):
    t = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t, 1)


def _corpus(engine, info: ModelInfo, cfg: BuildConfig, layer: int, bar: Progress, log, timings: dict):
    """1. The corpus: from `cfg.corpus_cache` when it was built the same way, else generated
    (and saved there)."""
    ccfg = corpus_mod.CorpusConfig(tokens=cfg.tokens, seed=cfg.seed, n_seq=cfg.n_seq)
    text_file = corpus_text_file(info, cfg)
    text_id = None
    if text_file is not None:
        from morph.sae.io import sha256_file

        text_id = {"file": text_file.name, "sha256": sha256_file(text_file)}
    corp = _cached_corpus(cfg.corpus_cache, layer, ccfg, info, text_id)
    if corp is not None:
        log(f"corpus: reusing {cfg.corpus_cache}")
        timings["corpus_reused"] = True  # corpus_s is then only the load
        return corp
    text = None
    if text_file is not None:
        text, meta = corpus_mod.load_text(text_file)
        log(f"corpus: reading {len(text)} generated documents from {text_file}")
        text_id["generated_by"] = meta.get("model_fingerprint")
    corp = corpus_mod.build_corpus(engine, [layer], ccfg, progress=bar("corpus", cfg.tokens), text=text)
    corp.stats["model_fingerprint"] = info.fingerprint
    corp.stats["text"] = text_id
    # Train on exactly what a cached corpus holds (float16), so a rebuild from
    # `--corpus` gives the same SAE bit for bit.
    corp.acts = {L: a.astype(np.float16).astype(np.float32) for L, a in corp.acts.items()}
    if cfg.corpus_cache:
        corp.save(cfg.corpus_cache)
    return corp


def _train(x: np.ndarray, corp, cfg: BuildConfig, bar: Progress):
    """2. The SAE, with held-out documents (reframed copies stay with their source)."""
    scfg = SAEConfig(width=cfg.width, k=cfg.k, epochs=cfg.epochs, seed=cfg.seed)
    steps = max(1, int(round(scfg.epochs * (len(x) * (1 - 1 / scfg.holdout_every)) // scfg.batch)))
    adv = bar("train", steps)
    return train_sae(x, scfg, corp.groups(), progress=lambda s, i: adv(1))


def _evidence(engine, sae, x: np.ndarray, corp, bar: Progress) -> tuple[dict, float]:
    """3. Evidence: where each latent fires in the corpus; and the share of dead latents."""
    idx, val = ev_mod.encode_corpus(sae, x, progress=bar("evidence", len(x)))
    piece_cache: dict[int, str] = {}

    def piece(tok: int) -> str:
        if tok not in piece_cache:
            piece_cache[tok] = engine.detokenize([tok], special=True)
        return piece_cache[tok]

    ev = ev_mod.build_evidence(sae, idx, val, corp.doc, corp.pos, corp.docs, piece)
    return ev, ev_mod.dead_share(ev)


def _select(engine, sae, layer: int, residual_norm: float, recipes: list, bar: Progress,
            direction: str = "latents") -> list:
    """4. Named features: both poles of every recipe (select.py)."""
    from morph.sae.select import Scorer, select_axis

    picks = []
    with engine.batch_runner(n_seq=32, n_ctx=4096, n_batch=_score_batch(engine)) as runner:
        scorer = Scorer(engine, runner, layer)
        adv = bar("features", len(recipes))
        for r in recipes:
            picks += select_axis(engine, sae, layer, residual_norm, r, scorer, direction=direction)
            adv(1)
    return picks


def _explain(engine, sae, picks: list, ev: dict, layer: int, bar: Progress) -> None:
    """5. Self-explanation (interpret.py) of every latent considered for a feature and of
    every named feature's direction: a strength sweep (self-similarity at the SAE layer,
    first-token entropy), the answer at the strength the composite picks. Stored in the
    evidence (per latent) and in the feature's scores (`self_explanation`)."""
    from morph.sae.interpret import make_probe, record, self_explain

    ids = sorted({c["latent"] for p in picks for c in p.candidates})
    dirs = [sae.W_dec[j] for j in ids] + [p.unit for p in picks]
    if not dirs:
        return
    probe = make_probe(engine, layer)
    sweeps = self_explain(engine, np.stack(dirs), probe, progress=bar("explain", len(dirs)))
    for j, sw in zip(ids, sweeps):
        ev["latents"][j]["explanation"] = sw.explanation
        ev["latents"][j]["self_explanation"] = record(probe, sw)
    for p, sw in zip(picks, sweeps[len(ids):]):
        p.scores["self_explanation"] = record(probe, sw)


def _write(out_dir: Path, info: ModelInfo, sae, ev: dict, picks: list, layer: int, residual_norm: float,
           dead: float, log) -> tuple[dict, list, list, list]:
    """6. The SAE, its evidence, the accepted features' vectors and their manifest entries.
    Returns (manifest's sae entry, accepted picks, rejected picks, their Features)."""
    from morph.sae.io import save_sae
    from morph.steering.catalog import Feature, write_entries
    from morph.steering.vector import ControlVector, residual_relative

    sae_name = f"sae-L{layer}.gguf"
    ev_name = f"sae-L{layer}.evidence.json.gz"
    sha = save_sae(sae, out_dir / sae_name)
    ev["sae_sha256"] = sha
    ev["layer"] = layer
    ev_mod.save_evidence(ev, out_dir / ev_name)
    # A pole whose best latents do not move most held-out pairs its way within the
    # fluency budget is reported, not shipped: a named feature must steer.
    kept = [p for p in picks if p.scores.get("accepted")]
    rejected = [p for p in picks if not p.scores.get("accepted")]
    for p in rejected:
        log(f"{p.name}: no SAE latent moves most held-out pairs its way within the fluency budget; "
            "not written")
    feats = []
    for p in kept:
        expl = "; ".join(_latent_expl(ev, j) for j in p.latents)
        meta = {"name": p.name, "description": p.description, "method": "sae", "sae": sae_name,
                "sae_sha256": sha, "latents": p.latents, "weights": p.weights, "layer": layer,
                "default_scale": p.default_scale, "residual_norm": round(residual_norm, 4),
                "direction": p.scores.get("direction", {}).get("direction", "latents"),
                "recipe": f"{p.axis}.json", "model_fingerprint": info.fingerprint}
        cv = ControlVector({layer: residual_relative(p.unit, residual_norm)}, info.hint, meta)
        cv.save(out_dir / f"{p.name}.gguf")
        feats.append(Feature(name=p.name, description=p.description, method="sae", file=f"{p.name}.gguf",
                             layer=layer, default_scale=p.default_scale,
                             residual_norm=round(residual_norm, 4), latents=p.latents,
                             latent_weights=p.weights, explanation=expl, scores=p.scores))
    sae_info = {"file": sae_name, "sha256": sha, "evidence": ev_name, "layer": layer,
                "width": sae.width, "k": sae.k, "fvu": sae.meta["fvu"], "l0": sae.meta["l0"],
                "dead_share": round(dead, 5), "train_tokens": sae.meta["train_tokens"],
                "residual_norm": round(residual_norm, 4)}
    write_entries(out_dir, feats, info.model_id, extra={"sae": sae_info}, replace_method="sae")
    return sae_info, kept, rejected, feats


def corpus_text_file(info: ModelInfo, cfg: BuildConfig) -> Path | None:
    """The generated text a build reads first: --text, else the text shipped for the model."""
    if not cfg.use_text:
        return None
    if cfg.text is not None:
        if not Path(cfg.text).is_file():
            raise MorphError(f"{cfg.text}: no such corpus text file")
        return Path(cfg.text)
    shipped = corpus_mod.text_path(info.model_id)
    return shipped if shipped.is_file() else None


def _cached_corpus(path: Path | None, layer: int, ccfg, info: ModelInfo, text_id: dict | None = None):
    """A saved corpus built with the same model, layer, seed, size and text, or None."""
    if path is None or not Path(path).is_file():
        return None
    c = corpus_mod.Corpus.load(path)
    st = c.stats
    same_text = (st.get("text") or {}).get("sha256") == (text_id or {}).get("sha256")
    same = (layer in c.acts and st.get("model_fingerprint") == info.fingerprint and st.get("seed") == ccfg.seed
            and st.get("requested") == ccfg.tokens and same_text)
    return c if same else None


def _score_batch(engine) -> int:
    """Tokens per scoring batch: every token's logits are kept, so bound that buffer (~256 MB)."""
    return int(max(64, min(1024, (256 << 20) // (4 * engine.n_vocab))))


def _latent_expl(ev: dict, j: int) -> str:
    lat = ev["latents"][j]
    s = f"latent {j}"
    if lat.get("explanation"):
        s += f": {lat['explanation']}"
    return s + f" (fires on {ev_mod.latent_label(ev, j)})"
