"""SAE feature directions combined with the diffmean signal (morph/sae/combine.py)."""

from __future__ import annotations

import numpy as np
import pytest

from morph import paths
from morph.errors import MorphError
from morph.sae import combine
from morph.sae.io import load_sae
from morph.sae.select import Scorer, _candidates
from morph.steering import diffmean as dm
from morph.steering.vector import residual_relative

SHIPPED = paths.shipped_vectors_dir() / "smollm2-135m-instruct"


@pytest.mark.parametrize("bad", ["proj:0", "proj:x", "blend:1.5", "blend:", "latents:3", "diffmean"])
def test_bad_direction_specs_are_refused(bad):
    with pytest.raises(MorphError, match="bad direction"):
        combine.parse(bad)


def test_projected_direction_lies_in_the_latents_span_and_steers_both_poles(engine):
    """proj:16 on the real SAE and the formality recipe: a direction spanned by the pole's
    16 best-separating latents, closer to diffmean than the best latent alone, that raises
    each pole's wording over the other's on held-out pairs (fails for a wrong sign, a
    random span, or a projection that is not one)."""
    sae = load_sae(SHIPPED / "sae-L16.gguf")
    layer, norm = 16, float(sae.meta["residual_norm"])
    recipe = dm.load_recipe(paths.recipes_dir() / "formality.json")
    train, test = dm.split_pairs(recipe)
    _, effect, mdiff = _candidates(engine, sae, layer, train[:12])
    d, _, _ = dm.diffmean_direction(engine, train[:12], layer)
    with engine.batch_runner(n_seq=16, n_ctx=2048, n_batch=512) as runner:
        scorer = Scorer(engine, runner, layer)
        jobs = [("base", test[:6], [], None)]
        for sign in (+1, -1):
            order = [int(j) for j in np.argsort(-sign * effect, kind="stable") if sign * mdiff[j] > 0]
            u, info = combine.direction("proj:16", sae, sae.W_dec[order[0]], sign * d, order)
            B = sae.W_dec[order[:16]].astype(np.float64).T
            resid = u - B @ np.linalg.lstsq(B, u.astype(np.float64), rcond=None)[0]
            assert np.linalg.norm(resid) < 1e-3 and abs(np.linalg.norm(u) - 1) < 1e-4
            assert info["span"] == order[:16]
            best_alone = float(sae.W_dec[order[0]] @ (sign * d)) / float(np.linalg.norm(sae.W_dec[order[0]]))
            assert info["cos_diffmean"] > max(best_alone, 0.3), info
            jobs.append((str(sign), test[:6], [], residual_relative(u, norm) * np.float32(0.2)))
        res = scorer.run(jobs, max_tokens=24)
    for sign in (+1, -1):
        moved = [sign * (x - y) for x, y in zip(res[str(sign)]["per_pair"], res["base"]["per_pair"])]
        assert np.mean(moved) > 0 and sum(m > 0 for m in moved) > len(moved) / 2, (sign, moved)

