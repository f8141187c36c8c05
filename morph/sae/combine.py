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

from morph.errors import MorphError
from morph.sae import variants as V

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
        return V.unit(latent_unit), {"direction": "latents"}
    if kind == "proj":
        span = [int(j) for j in order[:arg]]
        if not span:
            raise MorphError("no latent fires more on this pole: nothing to project onto")
        u = V.project(sae, dm_unit, span)
        info = {"direction": f"proj:{arg}", "span": span}
    else:
        u = V.blend(latent_unit, dm_unit, arg)
        info = {"direction": f"blend:{arg:g}"}
    info["cos_diffmean"] = round(V.cos(u, dm_unit), 4)
    info["cos_latents"] = round(V.cos(u, latent_unit), 4)
    return u, info
