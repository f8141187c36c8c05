"""Difference-of-means (CAA-style) control vectors from contrast sets.

A recipe (`vectors/recipes/<axis>.json`) holds pairs of texts that say the same thing in
two styles. The direction is mean(activations | positive) - mean(activations | negative)
at one block, per text first (so long texts do not dominate), stretched to the block's
median residual norm so that scales are fractions of it. The negative pole is the same
direction reversed. These are the baseline the SAE features are compared against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morph.errors import MorphError
from morph.steering.vector import ControlVector, residual_relative


@dataclass
class Recipe:
    axis: str
    positive: dict  # {"name", "description"}
    negative: dict
    pairs: list[dict]  # {"topic", "positive", "negative"}
    path: Path

    @property
    def poles(self) -> list[tuple[dict, int]]:
        return [(self.positive, +1), (self.negative, -1)]


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        r = Recipe(raw["axis"], raw["positive"], raw["negative"], raw["pairs"], path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MorphError(f"{path}: not a contrast-set recipe ({e})") from None
    for pole in (r.positive, r.negative):
        if not pole.get("name") or not pole.get("description"):
            raise MorphError(f"{path}: each pole needs a name and a description")
    bad = [i for i, p in enumerate(r.pairs) if not p.get("positive") or not p.get("negative")]
    if bad or len(r.pairs) < 2:
        raise MorphError(f"{path}: needs at least 2 complete pairs (incomplete: {bad[:5]})")
    return r


def split_pairs(recipe: Recipe, held_out: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train/held-out split so that scores are measured on unseen pairs."""
    idx = np.random.default_rng(seed).permutation(len(recipe.pairs))
    n_test = max(1, int(round(len(idx) * held_out)))
    test = [recipe.pairs[i] for i in sorted(idx[:n_test])]
    train = [recipe.pairs[i] for i in sorted(idx[n_test:])]
    return train, test


def text_means(engine, texts: list[str], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-text mean activation (n_texts, n_embd) and all token norms at `layer`."""
    acts = engine.capture(texts, layer)
    means = np.stack([a.mean(axis=0) for a in acts])
    norms = np.concatenate([np.linalg.norm(a, axis=1) for a in acts])
    return means, norms


def diffmean_direction(engine, pairs: list[dict], layer: int) -> tuple[np.ndarray, float, float]:
    """(unit direction, median residual norm, separation) for positive minus negative.

    separation: how far apart the two sets' projections are, in pooled standard
    deviations (Cohen's d); near 0 means the contrast set does not isolate the style.
    """
    pos, pn = text_means(engine, [p["positive"] for p in pairs], layer)
    neg, nn = text_means(engine, [p["negative"] for p in pairs], layer)
    d = pos.mean(axis=0) - neg.mean(axis=0)
    unit = d / np.linalg.norm(d)
    pp, np_ = pos @ unit, neg @ unit
    pooled = np.sqrt((pp.var(ddof=1) + np_.var(ddof=1)) / 2) + 1e-9
    return unit.astype(np.float32), float(np.median(np.concatenate([pn, nn]))), float((pp.mean() - np_.mean()) / pooled)


def make_vector(unit: np.ndarray, layer: int, residual_norm: float, hint: str, meta: dict) -> ControlVector:
    return ControlVector({layer: residual_relative(unit, residual_norm)}, model_hint=hint, meta=meta)


NEUTRAL_PROMPT = "Here is a short note:\n"


def style_shift(engine, pairs: list[dict], cv: ControlVector | None, prompt: str = NEUTRAL_PROMPT) -> float:
    """Mean per-token log-prob of the positive texts minus the negative ones, under `cv`."""
    diffs = []
    for p in pairs:
        lp = engine.continuation_logprobs(prompt, p["positive"], cv).mean()
        ln = engine.continuation_logprobs(prompt, p["negative"], cv).mean()
        diffs.append(lp - ln)
    return float(np.mean(diffs))


def fluency_cost(engine, texts: list[str], cv: ControlVector | None, base: list[float] | None = None) -> tuple[float, list[float]]:
    """Mean per-token NLL of neutral texts under `cv`, minus the unsteered NLL (nats/token)."""
    nll = [float(-engine.continuation_logprobs(NEUTRAL_PROMPT, t, cv).mean()) for t in texts]
    if base is None:
        return 0.0, nll
    return float(np.mean(nll) - np.mean(base)), nll


DEFAULT_SCALES = (0.1, 0.2, 0.3, 0.45)
FLUENCY_BUDGET = 0.3  # nats/token of extra NLL on neutral text we accept for the default


def build_recipe(engine, recipe: Recipe, layer: int, hint: str, fingerprint: str,
                 scales=DEFAULT_SCALES, budget: float = FLUENCY_BUDGET,
                 neutral: list[str] | None = None, n_eval: int = 8, progress=None):
    """Both poles of a recipe as (Feature, ControlVector) pairs, plus a measurement report.

    The default scale is the largest of `scales` whose fluency cost (extra NLL per token
    on neutral text) stays within `budget`, among those that move the held-out style
    log-prob difference the right way. FACTS: the usable window is narrow, so measure.
    """
    from morph.steering.catalog import Feature

    train, test = split_pairs(recipe)
    test = test[:n_eval]
    unit, norm, sep = diffmean_direction(engine, train, layer)
    neutral = neutral or NEUTRAL_TEXTS
    _, base_nll = fluency_cost(engine, neutral, None)
    base_shift = style_shift(engine, test, None)
    sweep = []
    for a in scales:
        row = {"scale": a}
        for sign, key in ((+1, "pos"), (-1, "neg")):
            cv = make_vector(unit, layer, norm, hint, {}) * (sign * a)
            row[f"shift_{key}"] = round(style_shift(engine, test, cv) - base_shift, 4)
            row[f"dnll_{key}"] = round(fluency_cost(engine, neutral, cv, base_nll)[0], 4)
        sweep.append(row)
        if progress:
            progress(recipe.axis, row)
    out = []
    for pole, sign in recipe.poles:
        key = "pos" if sign > 0 else "neg"
        ok = [r for r in sweep if r[f"dnll_{key}"] <= budget and sign * r[f"shift_{key}"] > 0]
        chosen = max(ok, key=lambda r: r["scale"]) if ok else min(sweep, key=lambda r: r["scale"])
        default = chosen["scale"]
        scores = {
            "separation_d": round(sep, 3),
            "heldout_pairs": len(test),
            "style_shift_at_default": chosen[f"shift_{key}"] * sign,
            "extra_nll_at_default": chosen[f"dnll_{key}"],
        }
        name = pole["name"]
        meta = {
            "name": name, "description": pole["description"], "method": "diffmean",
            "layer": layer, "default_scale": default, "residual_norm": round(norm, 4),
            "recipe": recipe.path.name, "pairs_used": len(train), "model_fingerprint": fingerprint,
        }
        cv = make_vector(unit * sign, layer, norm, hint, meta)
        feat = Feature(
            name=name, description=pole["description"], method="diffmean",
            file=f"{name}.diffmean.gguf", layer=layer, default_scale=default,
            residual_norm=round(norm, 4), scores=scores,
        )
        out.append((feat, cv))
    report = {"axis": recipe.axis, "layer": layer, "residual_norm": round(norm, 4),
              "separation_d": round(sep, 3), "train_pairs": len(train), "heldout_pairs": len(test),
              "base_nll": round(float(np.mean(base_nll)), 4), "sweep": sweep,
              "defaults": {f.name: f.default_scale for f, _ in out}}
    return out, report


# Neutral, register-free text for the fluency measure (written for morph).
NEUTRAL_TEXTS = [
    "The library opens at nine in the morning and closes at six in the evening.",
    "Water boils at a lower temperature on a high mountain than at sea level.",
    "The train from the city arrives at the station every twenty minutes.",
    "She planted tomatoes and beans in the garden behind the house.",
    "The report lists the costs of the project for each month of the year.",
    "Most birds build their nests in spring, when food is easy to find.",
]
