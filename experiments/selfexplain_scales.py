"""Does the self-explanation composite predict a good steering scale? (issue 10, item 3)

For every feature x method in a `morph eval --split tune` results file, this sweeps the
feature's direction with morph/sae/interpret.py (self-similarity at the SAE layer,
first-token entropy, composite) and asks how often the composite's scale falls within the
best 3 (and is the best) of the eval's own scale sweep, ranked as the eval ranks (meets
the goal first, then the harmonic mean).

Units: a steering scale s is a multiple of the feature layer's median residual norm (the
vector files are stored that way, vector.residual_relative); a self-explanation strength
is a multiple of the insert block's median norm. The same unit, "x the median norm where
it is written", so the eval's x m (m times the default scale d) is strength m * d. Two
predictions:

- native: the composite's pick on interpret.STRENGTHS (1..12), mapped to m = a / d and the
  nearest scale of the eval's grid;
- eval grid: the composite's pick among the eval's own scales (strengths m * d, plus 0).

Prints one JSON object. Usage (from the repository root):

    python -m experiments.selfexplain_scales --tune results.json [--apply default] \
        [--sweeps saved.json] [--save-sweeps saved.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from morph.eval.run import _rank  # (the eval's own ranking)
from morph.sae import interpret as I

MULTS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)  # eval multiples the sweep covers


def load_rows(path: str, apply: str) -> dict[str, list[dict]]:
    res = json.load(gzip.open(path) if path.endswith(".gz") else open(path))
    by: dict[str, list[dict]] = {}
    for r in res["rows"]:
        if r.get("method") and r["kind"] == r["method"] and r["apply"] == apply and r["hmean"] is not None:
            by.setdefault(f"{r['concept']}@{r['method']}", []).append(r)
    return by


def run_sweeps(keys: list[str], extra_mults: list[float]) -> dict[str, dict]:
    from morph import models
    from morph.engine.llama import LlamaEngine
    from morph.steering.catalog import Catalog

    info = models.check(models.resolve(None))
    eng = LlamaEngine(info, n_ctx=512, threads=1)
    cat = Catalog(info.model_id)
    out = {}
    try:
        for key in keys:
            f = cat.get(key, experimental=True)
            probe = I.make_probe(eng, f.layer)
            mults = sorted(set(MULTS) | set(extra_mults))
            grid = sorted({0.0} | {round(m * f.default_scale, 4) for m in mults} | set(I.STRENGTHS))
            sw = I.sweep(eng, f.load_vector().directions[f.layer][None, :], probe, grid)[0]
            out[key] = {"key": key, "default_scale": f.default_scale, **sw.to_json()}
            print(f"swept {key}", file=sys.stderr, flush=True)
    finally:
        eng.close()
    return out


def pick(sw: dict, strengths: list[float]) -> tuple[float, bool]:
    """The composite's strength among `strengths` (0 first) and whether it was the fallback."""
    idx = [min(range(len(sw["strengths"])), key=lambda i: abs(sw["strengths"][i] - a)) for a in strengths]
    s = I.Sweep([sw["strengths"][i] for i in idx], [sw["self_similarity"][i] for i in idx],
                [sw["entropy"][i] for i in idx])
    comp, best = I.choose(s)
    return s.strengths[best], not any(c > 0 for c in comp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", required=True, help="morph eval --split tune results JSON")
    ap.add_argument("--apply", default="default", help="which apply mode's scale sweep [default]")
    ap.add_argument("--sweeps", help="reuse sweeps saved with --save-sweeps")
    ap.add_argument("--save-sweeps")
    a = ap.parse_args()
    by = {k: rs for k, rs in load_rows(a.tune, a.apply).items() if len({r["scale_x"] for r in rs}) >= 4}
    if not by:
        sys.exit(f"no feature has a sweep of 4+ scales at apply={a.apply} in {a.tune}")
    extra = sorted({r["scale_x"] for rs in by.values() for r in rs})
    if a.sweeps:
        sweeps = {f["key"]: f for f in json.load(open(a.sweeps))["features"]}
    else:
        sweeps = run_sweeps(sorted(by), extra)
    if a.save_sweeps:
        Path(a.save_sweeps).write_text(json.dumps({"features": list(sweeps.values())}, indent=1))
    n = hit3 = hit1 = hit_nat = fallbacks = chance3 = chance1 = 0.0
    per = []
    for key, rs in sorted(by.items()):
        if key not in sweeps:
            continue
        sw, d = sweeps[key], sweeps[key]["default_scale"]
        grid = sorted({r["scale_x"] for r in rs})
        ranked = [r["scale_x"] for r in sorted(rs, key=_rank, reverse=True)]
        best3 = ranked[:3]
        a_nat, _ = pick(sw, [0.0] + list(I.STRENGTHS[1:]))
        m_nat = min(grid, key=lambda m: abs(m - a_nat / d))
        pts = {m * d: m for m in grid}
        a_g, fb = pick(sw, [0.0] + sorted(pts))
        m_g = pts[min(pts, key=lambda x: abs(x - a_g))]
        n += 1
        hit3 += m_g in best3
        hit1 += m_g == ranked[0]
        hit_nat += m_nat in best3
        fallbacks += fb
        chance3 += 3 / len(grid)
        chance1 += 1 / len(grid)
        per.append({"feature": key, "default_scale": d, "eval_ranking": ranked, "composite_x": m_g,
                    "fallback": fb, "native_strength": a_nat, "native_x": m_nat})
    print(json.dumps({
        "tune": a.tune, "apply": a.apply, "n_features": int(n),
        "composite_in_best3": f"{int(hit3)}/{int(n)}", "composite_best": f"{int(hit1)}/{int(n)}",
        "chance_best3": round(chance3 / n, 3), "chance_best": round(chance1 / n, 3),
        "native_in_best3": f"{int(hit_nat)}/{int(n)}", "fallbacks": int(fallbacks), "features": per,
    }, indent=1))


if __name__ == "__main__":
    main()
