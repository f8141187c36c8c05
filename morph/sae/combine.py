"""Directions that combine a pole's SAE latents with the recipe's diffmean signal.

`morph vectors build --direction SPEC` (issue 10 item 4). SPEC:

- `latents` (default): the weighted sum of the picked latents' decoder rows (select.py);
- `proj:M`: the diffmean direction of the recipe's training pairs, projected onto the span
  of the pole's M best-separating latents' decoder rows (least squares): the part of the
  diffmean signal those M latents can express;
- `blend:A`: A x the `latents` direction + (1 - A) x the diffmean direction, renormalised.

The pole's latents are ranked as select.py ranks them (paired effect size on the training
pairs, only latents that fire more on the pole). Orientation: toward the pole.
"""

from __future__ import annotations

import numpy as np

from morph.errors import MorphError

KINDS = ("latents", "proj", "blend")


def parse(spec: str) -> tuple[str, float | int | None]:
    """'latents' | 'proj:M' (M >= 1 latents) | 'blend:A' (0 <= A <= 1) -> (kind, arg)."""
    kind, _, arg = (spec or "latents").strip().partition(":")
    try:
        if kind == "latents" and not arg:
            return kind, None
        if kind == "proj" and int(arg) >= 1:
            return kind, int(arg)
        if kind == "blend" and 0.0 <= float(arg) <= 1.0:
            return kind, float(arg)
    except ValueError:
        pass
    raise MorphError(f"bad direction {spec!r}: use latents, proj:M (M >= 1) or blend:A (0..1)")


def direction(spec: str, sae, latent_unit, dm_unit, order) -> tuple:
    """(unit, info) for one pole. latent_unit: the `latents` direction; dm_unit: the
    diffmean direction oriented toward the pole; order: the pole's latents, best first."""
    kind, arg = parse(spec)
    if kind == "latents":
        return unit(latent_unit), {"direction": "latents"}
    if kind == "proj":
        span = [int(j) for j in order[:arg]]
        if not span:
            raise MorphError("no latent fires more on this pole: nothing to project onto")
        u = project(sae, dm_unit, span)
        info = {"direction": f"proj:{arg}", "span": span}
    else:
        u = blend(latent_unit, dm_unit, arg)
        info = {"direction": f"blend:{arg:g}"}
    info["cos_diffmean"] = round(cos(u, dm_unit), 4)
    info["cos_latents"] = round(cos(u, latent_unit), 4)
    return u, info


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v)
    if not n > 0:
        raise ValueError("zero direction")
    return (v / n).astype(np.float32)


def project(sae, d: np.ndarray, latents: list[int]) -> np.ndarray:
    """d's least-squares projection onto span(W_dec[latents]); keeps d's orientation."""
    B = sae.W_dec[latents].astype(np.float64).T  # (n_embd, m)
    coef, *_ = np.linalg.lstsq(B, np.asarray(d, np.float64), rcond=None)
    p = B @ coef
    if p @ d < 0:
        p = -p
    return unit(p)


def blend(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    return unit(alpha * unit(a).astype(np.float64) + (1 - alpha) * unit(b).astype(np.float64))


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(unit(a).astype(np.float64) @ unit(b).astype(np.float64))
