"""Ways to turn SAE latents (and the diffmean signal) into one steering direction (the
variants experiments/sae_variants.py screens; the shipped ones are morph/sae/combine.py's).

All directions are unit vectors at the SAE's layer, in the residual stream's own basis
(a control vector is then the unit times the layer's median residual norm times a scale).

For one pole of a recipe (sign +1: positive texts, -1: negative), from the training pairs:

- `ranked`: latents ordered by paired effect size (select.py's ranking), with their mean
  code differences (the SAE's own estimate of how much more each fires on the pole);
- `latent(j)`: one decoder row;
- `sparse_diff(m)`: the SAE's reconstruction of the pole's mean difference restricted to
  its m best-separating latents, sum_j mean_diff_j * W_dec[j] (m = all: the whole code
  difference, decoded);
- `project(d, m)`: a direction d (e.g. diffmean) projected onto the span of the m top
  latents' decoder rows (least squares): the part of the diffmean signal the SAE can name;
- `blend(a, b, alpha)`: alpha * a + (1 - alpha) * b, renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from morph.sae.combine import blend, cos, project, unit  # noqa: F401 (variants use them)
from morph.sae.select import paired_effect, text_codes
from morph.sae.train import SAE


@dataclass
class PoleLatents:
    sign: int
    order: np.ndarray  # latent ids, best-separating first (only those with sign * mean_diff > 0)
    effect: np.ndarray  # signed effect size per latent (all latents), oriented to the pole
    mdiff: np.ndarray  # mean code difference per latent, oriented to the pole


def pole_latents(engine, sae: SAE, layer: int, pairs: list[dict]) -> dict[int, PoleLatents]:
    """Per sign, the latents ranked as select.py ranks them, from one capture of the pairs."""
    pos = text_codes(engine, sae, [p["positive"] for p in pairs], layer)
    neg = text_codes(engine, sae, [p["negative"] for p in pairs], layer)
    effect, mdiff = paired_effect(pos, neg)
    out = {}
    for sign in (+1, -1):
        e, m = sign * effect, sign * mdiff
        order = np.argsort(-e, kind="stable")
        out[sign] = PoleLatents(sign, np.array([j for j in order if m[j] > 0]), e, m)
    return out


def latent(sae: SAE, j: int) -> np.ndarray:
    return unit(sae.W_dec[j])


def weighted(sae: SAE, latents: list[int], weights: list[float]) -> np.ndarray:
    return unit((np.asarray(weights, np.float64)[:, None] * sae.W_dec[latents]).sum(axis=0))


def sparse_diff(sae: SAE, pl: PoleLatents, m: int | None) -> np.ndarray:
    lat = pl.order[:m] if m else pl.order
    return weighted(sae, list(lat), list(pl.mdiff[lat]))
