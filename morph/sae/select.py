"""Named features from SAE latents: rank on contrast sets, test by steering, pick a scale.

For each recipe (`vectors/recipes/<axis>.json`, pairs of texts saying the same thing in
two styles) and each of its poles:

1. rank latents by how much more they fire on the pole's texts than on the other pole's
   (paired effect size of per-text mean activations, training pairs only);
2. steer with each of the top candidates' decoder directions on a few training pairs and
   keep the 1-3 that move the log-prob of the pole's wording most (weights ~ that shift);
3. the vector is the weighted sum of their decoder directions, stretched to the layer's
   median residual norm (scales are fractions of it);
4. sweep the scale on neutral text (extra NLL per token); the default is the largest
   scale within the fluency budget whose held-out style shift has the right sign.

Split, prompt, neutral texts and budget are the diffmean builder's, so the two methods'
scores are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from morph.errors import MorphError
from morph.engine.base import BatchRunner
from morph.sae import combine
from morph.sae.score import Item, logprobs
from morph.sae.train import SAE
from morph.steering import diffmean as dm
from morph.steering.vector import residual_relative

SCALES = (0.1, 0.2, 0.3, 0.45, 0.6)
LOW_SCALES = (0.0125, 0.025, 0.05)  # tried only when 0.1 already costs more than the budget
PROBE_SCALE = 0.3
N_CANDIDATES = 3
N_RANK = 32  # training pairs whose activations rank the latents
N_PROBE = 4  # training pairs used to compare candidates
PROBE_TOKENS = 24  # probes score only the first tokens of each text (cost)
N_EVAL = 8  # held-out pairs for the reported shift (as diffmean)


@dataclass
class Selected:
    name: str
    description: str
    axis: str
    sign: int  # +1 positive pole, -1 negative pole
    latents: list[int]
    weights: list[float]
    unit: np.ndarray  # unit direction at the layer
    default_scale: float
    scores: dict = field(default_factory=dict)
    candidates: list[dict] = field(default_factory=list)


def text_codes(engine, sae: SAE, texts: list[str], layer: int) -> np.ndarray:
    """Mean SAE code per text (n_texts, width): how much each latent fires on it."""
    acts = engine.capture(texts, layer)
    return np.stack([sae.encode_dense(a).mean(axis=0) if len(a) else np.zeros(sae.width, np.float32)
                     for a in acts])


def paired_effect(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(effect size, mean difference) per latent over paired texts."""
    d = pos - neg
    mu = d.mean(axis=0)
    sd = d.std(axis=0, ddof=1) if len(d) > 1 else np.ones_like(mu)
    return mu / (sd + 1e-6 + 0.05 * np.abs(mu)), mu


class Scorer:
    """Style shift and fluency cost, batched over sequences with their own vectors."""

    def __init__(self, engine, runner: BatchRunner, layer: int):
        self.engine, self.runner, self.layer = engine, runner, layer
        self.prefix = engine.tokenize(dm.NEUTRAL_PROMPT)
        self._tok: dict[str, list[int]] = {}

    def _item(self, text: str, vec, max_tokens: int | None = None) -> Item:
        if text not in self._tok:
            self._tok[text] = self.engine.tokenize(text, add_bos=False)
        return Item(self.prefix + self._tok[text][:max_tokens], len(self.prefix), vec)

    def run(self, jobs: list[tuple[str, list[dict], list[str], np.ndarray | None]],
            max_tokens: int | None = None) -> dict[str, dict]:
        """jobs: (key, pairs, neutral texts, vector). Per key: shift (mean over pairs of
        mean-logprob(positive) - mean-logprob(negative)), per-pair values, and neutral NLL."""
        items, where = [], []
        for key, pairs, neutral, vec in jobs:
            for i, p in enumerate(pairs):
                items += [self._item(p["positive"], vec, max_tokens), self._item(p["negative"], vec, max_tokens)]
                where += [(key, "pos", i), (key, "neg", i)]
            for i, t in enumerate(neutral):
                items.append(self._item(t, vec))
                where.append((key, "neu", i))
        lps = logprobs(self.runner, items, self.layer)
        out: dict[str, dict] = {key: {"pos": {}, "neg": {}, "neu": {}} for key, *_ in jobs}
        for (key, kind, i), lp in zip(where, lps):
            out[key][kind][i] = float(lp.mean())
        res = {}
        for key, pairs, neutral, _ in jobs:
            o = out[key]
            per = [o["pos"][i] - o["neg"][i] for i in range(len(pairs))]
            res[key] = {"shift": float(np.mean(per)) if per else 0.0, "per_pair": per,
                        "nll": float(-np.mean(list(o["neu"].values()))) if neutral else 0.0}
        return res


def select_axis(engine, sae: SAE, layer: int, residual_norm: float, recipe, scorer: Scorer,
                budget: float = dm.FLUENCY_BUDGET, progress: Callable[[str], None] | None = None,
                full_sweep: bool = False, direction: str = "latents") -> list[Selected]:
    """The recipe's two poles as named features: latents (steps 1-3), optionally combined
    with the recipe's diffmean direction (combine.py), then a scale (4)."""
    train, test = dm.split_pairs(recipe)
    test = test[:N_EVAL]

    def vec(unit, scale):
        return residual_relative(unit, residual_norm) * np.float32(scale)

    cands, effect, mdiff = _candidates(engine, sae, layer, train[:N_RANK])
    picks = _pick_latents(sae, recipe, cands, effect, mdiff, scorer, train[:N_PROBE], vec, progress)
    if combine.parse(direction)[0] != "latents":
        _combine(engine, sae, layer, train, picks, effect, mdiff, direction)
    swept = _sweep_fluency(picks, scorer, test, vec, budget, full_sweep)
    base_test = scorer.run([("base", test, [], None)])["base"] if not full_sweep else swept["base"]
    _choose_scales(picks, swept, base_test, scorer, test, vec, budget, full_sweep)
    return picks


def _candidates(engine, sae: SAE, layer: int, rank: list[dict]):
    """Per pole sign, the latents that fire most on its texts over the other pole's
    (paired effect size), and the effect sizes and mean differences of all latents."""
    pos = text_codes(engine, sae, [p["positive"] for p in rank], layer)
    neg = text_codes(engine, sae, [p["negative"] for p in rank], layer)
    effect, mdiff = paired_effect(pos, neg)
    cands: dict[int, list[int]] = {}
    for sign in (+1, -1):
        order = np.argsort(-sign * effect, kind="stable")
        cands[sign] = [int(j) for j in order[:N_CANDIDATES] if sign * mdiff[j] > 0]
    return cands, effect, mdiff


def _pick_latents(sae: SAE, recipe, cands, effect, mdiff, scorer: Scorer, probe: list[dict], vec,
                  progress) -> list[Selected]:
    """Steer with each candidate on the probe pairs (with the unsteered baseline, in one
    batched run); per pole keep the 1-3 that move its wording most, weighted by that."""
    jobs = [("base", probe, [], None)]
    for sign, js in cands.items():
        for j in js:
            jobs.append((f"{sign}:{j}", probe, [], vec(sae.W_dec[j], PROBE_SCALE)))
    probed = scorer.run(jobs, max_tokens=PROBE_TOKENS)
    base_probe = probed["base"]["shift"]

    picks = []
    for pole, sign in recipe.poles:
        rows = []
        for j in cands[sign]:
            s = sign * (probed[f"{sign}:{j}"]["shift"] - base_probe)
            rows.append({"latent": j, "effect_d": round(float(sign * effect[j]), 3),
                         "mean_diff": round(float(sign * mdiff[j]), 4), "probe_shift": round(s, 4)})
        if not rows:
            raise MorphError(f"{recipe.axis}: no latent fires more on {pole['name']!r} texts")
        good = sorted([r for r in rows if r["probe_shift"] > 0], key=lambda r: -r["probe_shift"])
        if good:
            best = good[0]["probe_shift"]
            chosen = [r for r in good if r["probe_shift"] >= 0.5 * best][:3]
            w = np.array([r["probe_shift"] for r in chosen])
        else:  # no candidate steers measurably: fall back to the best-separating latent
            chosen = rows[:1]
            w = np.ones(1)
        w = w / w.sum()
        lat = [r["latent"] for r in chosen]
        d = (w[:, None] * sae.W_dec[lat]).sum(axis=0)
        unit = (d / np.linalg.norm(d)).astype(np.float32)
        picks.append(Selected(pole["name"], pole["description"], recipe.axis, sign, lat,
                              [round(float(x), 4) for x in w], unit, SCALES[0], candidates=rows))
        if progress:
            progress(f"{pole['name']}: latents {lat}")
    return picks


def _combine(engine, sae: SAE, layer: int, train: list[dict], picks: list[Selected], effect, mdiff,
             direction: str) -> None:
    """Replace each pick's unit by the combined direction (combine.py); the diffmean
    direction from the same training pairs the latents were ranked on."""
    d, _, _ = dm.diffmean_direction(engine, train, layer)
    for p in picks:
        order = [int(j) for j in np.argsort(-p.sign * effect, kind="stable") if p.sign * mdiff[j] > 0]
        p.unit, info = combine.direction(direction, sae, p.unit, p.sign * d, order)
        p.scores["direction"] = info


def _sweep_fluency(picks: list[Selected], scorer: Scorer, test: list[dict], vec, budget: float,
                   full_sweep: bool) -> dict:
    """Fluency cost at every scale (neutral text only, cheap; with full_sweep also the
    held-out style shift at every scale). Sets each pick's `scores["sweep"]`; returns the
    raw results by "name@scale" and "base"."""
    neutral = dm.NEUTRAL_TEXTS
    pairs = test if full_sweep else []
    jobs = [("base", pairs, neutral, None)]
    for p in picks:
        for a in SCALES:
            jobs.append((f"{p.name}@{a}", pairs, neutral, vec(p.unit, a)))
    swept = scorer.run(jobs)
    base_nll = swept["base"]["nll"]
    # Some directions cost more than the whole budget even at the smallest scale (Gemma 3:
    # a few huge residual dimensions set the median norm): try smaller scales for those.
    low = {p.name for p in picks if min(swept[f"{p.name}@{a}"]["nll"] for a in SCALES) - base_nll > budget}
    if low:
        swept.update(scorer.run([(f"{p.name}@{a}", pairs, neutral, vec(p.unit, a))
                                 for p in picks if p.name in low for a in LOW_SCALES]))
    for p in picks:
        grid = (LOW_SCALES if p.name in low else ()) + SCALES
        sweep = [{"scale": a, "extra_nll": round(swept[f"{p.name}@{a}"]["nll"] - base_nll, 4)} for a in grid]
        if full_sweep:
            for row in sweep:
                r = swept[f"{p.name}@{row['scale']}"]
                row["shift"] = round(p.sign * (r["shift"] - swept["base"]["shift"]), 4)
        p.scores = {**p.scores, "sweep": sweep}
    return swept


def _choose_scales(picks: list[Selected], swept: dict, base_test: dict, scorer: Scorer, test: list[dict],
                   vec, budget: float, full_sweep: bool) -> None:
    """Per pick, the largest scale within the fluency budget whose held-out shift has the
    right sign (scales tried from the largest down, in batched rounds); sets the scores."""
    order = {}
    for p in picks:
        ok = [r for r in p.scores["sweep"] if r["extra_nll"] <= budget]
        order[p.name] = sorted(ok, key=lambda r: -r["scale"]) or p.scores["sweep"][:1]
    at = {p.name: 0 for p in picks}
    done: dict[str, tuple[dict, float, int]] = {}
    while len(done) < len(picks):
        todo = [p for p in picks if p.name not in done]
        if full_sweep:
            res = {p.name: swept[f"{p.name}@{order[p.name][at[p.name]]['scale']}"] for p in todo}
        else:
            res = scorer.run([(p.name, test, [], vec(p.unit, order[p.name][at[p.name]]["scale"])) for p in todo])
        for p in todo:
            row, r = order[p.name][at[p.name]], res[p.name]
            shift = p.sign * (r["shift"] - base_test["shift"])
            wins = sum(p.sign * (x - y) > 0 for x, y in zip(r["per_pair"], base_test["per_pair"]))
            if shift > 0 or at[p.name] == len(order[p.name]) - 1:
                done[p.name] = (row, shift, wins)
            else:
                at[p.name] += 1
    for p in picks:
        row, shift, wins = done[p.name]
        p.default_scale = row["scale"]
        p.scores.update({
            "heldout_pairs": len(test),
            "style_shift_at_default": round(shift, 4),
            "extra_nll_at_default": row["extra_nll"],
            "heldout_wins_at_default": f"{wins}/{len(test)}",
            "activation_effect_d": max(c["effect_d"] for c in p.candidates if c["latent"] in p.latents),
            "probe_shift": max(c["probe_shift"] for c in p.candidates if c["latent"] in p.latents),
            "within_budget": row["extra_nll"] <= budget and shift > 0,
            # shipped only if it also moves most held-out pairs its way, not just the mean
            "accepted": row["extra_nll"] <= budget and shift > 0 and 2 * wins > len(test),
        })
