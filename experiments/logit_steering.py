"""How much weaker is logit steering than residual steering? One JSON object on stdout.

    python -m experiments.logit_steering [--methods sae[,diffmean]] [--pairs 8] [--threads 1]

For every shipped feature that is a pole of a contrast recipe (vectors/recipes/), on the
recipe's held-out pairs (the split `morph vectors` builds with, so never trained on):

- pole shift: mean per-token log-prob of the feature's own pole minus the other pole
  after a neutral prompt (morph/steering/diffmean.py's measure), minus the unsteered
  value: > 0 means the feature moves the text its way;
- extra NLL: mean per-token NLL of neutral sentences minus unsteered (fluency cost);

each for residual steering (the control vector at every position) and for logit steering
(morph/steering/logits.py: the same vector's direct path as a token bias), at matched
scales. `ratio` = logit shift / residual shift at the same scale; `logit_scale_to_match`
is the smallest swept logit scale whose shift reaches the residual shift at the feature's
default scale (scales above morph's limit of 2.0 are swept to show how far off it is).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


from morph import models, paths
from morph.engine.llama import LlamaEngine
from morph.steering import diffmean as dm
from morph.steering.catalog import Catalog
from morph.steering.logits import LogitSteering

RESIDUAL_SCALES = (0.5,)  # plus each feature's default scale
LOGIT_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)  # plus the default scale


def mean_lp(engine, text, cv=None, bias=None, prompt=dm.NEUTRAL_PROMPT) -> float:
    return float(engine.continuation_logprobs(prompt, text, cv, logit_bias=bias).mean())


def shift(engine, pairs, sign, cv=None, bias=None) -> float:
    """Own pole minus the other pole (sign: +1 the recipe's positive pole is the feature's)."""
    return sign * float(np.mean([mean_lp(engine, p["positive"], cv, bias) - mean_lp(engine, p["negative"], cv, bias)
                                 for p in pairs]))


def nll(engine, cv=None, bias=None) -> float:
    return float(np.mean([-mean_lp(engine, t, cv, bias) for t in dm.NEUTRAL_TEXTS]))


def summarize(rows: list[dict]) -> dict:
    """Across features: the ratio at matched scales, how often each moves its way, the logit
    scale that matches the residual shift, and the logit shift at matched fluency cost (the
    largest swept logit scale whose extra NLL stays within the residual's at its default)."""
    ratios = [r["ratio_at_default"] for r in rows if r["ratio_at_default"] is not None]
    matched = [r["logit_scale_to_match"] for r in rows if r["logit_scale_to_match"] is not None]
    fluency = {}
    for r in rows:
        res = r["residual"][f"{r['default_scale']:g}"]
        ok = [(float(k), x) for k, x in r["logits"].items() if x["extra_nll"] <= max(res["extra_nll"], 0.0)]
        if ok:
            k, x = max(ok, key=lambda kx: kx[0])
            fluency[r["feature"]] = {"logit_scale": k, "logit_shift": x["shift"], "residual_shift": res["shift"],
                                     "ratio": round(x["shift"] / res["shift"], 3) if res["shift"] else None}
    fr = [v["ratio"] for v in fluency.values() if v["ratio"] is not None]
    return {
        "features": len(rows),
        "median_ratio_at_default": round(float(np.median(ratios)), 3) if ratios else None,
        "logit_right_direction_at_default": sum(r["logits"][f"{r['default_scale']:g}"]["shift"] > 0 for r in rows),
        "residual_right_direction_at_default": sum(r["residual"][f"{r['default_scale']:g}"]["shift"] > 0 for r in rows),
        "median_logit_scale_to_match": float(np.median(matched)) if matched else None,
        "never_matched_up_to_8": [r["feature"] for r in rows if r["logit_scale_to_match"] is None],
        "median_ratio_at_matched_fluency": round(float(np.median(fr)), 3) if fr else None,
        "at_matched_fluency": fluency,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="sae", help="comma-separated: sae,diffmean")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize", metavar="JSON", help="recompute the summary of an earlier run's output")
    args = ap.parse_args()
    if args.summarize:
        old = json.loads(Path(args.summarize).read_text())
        old["summary"] = summarize(old["rows"])
        print(json.dumps(old, indent=1))
        return 0
    t_start = time.time()
    info = models.check(models.resolve(args.model))
    engine = LlamaEngine(info, n_ctx=2048, threads=args.threads)
    t = time.perf_counter()
    ls = LogitSteering.for_engine(engine, info)
    setup_s = time.perf_counter() - t
    cat = Catalog(info.model_id)
    methods = args.methods.split(",")
    base_nll = nll(engine)
    rows = []
    for path in sorted(paths.recipes_dir().glob("*.json")):
        r = dm.load_recipe(path)
        pairs = dm.split_pairs(r)[1][: args.pairs]
        for pole, sign in r.poles:
            for f in cat.features:
                if f.name != pole["name"] or f.method not in methods:
                    continue
                v = f.load_vector()
                base = shift(engine, pairs, sign)
                row = {"feature": f.key, "recipe": path.name, "default_scale": f.default_scale,
                       "residual": {}, "logits": {}}
                for s in sorted(set(RESIDUAL_SCALES) | {f.default_scale}):
                    cv = v * s
                    row["residual"][f"{s:g}"] = {"shift": round(shift(engine, pairs, sign, cv) - base, 4),
                                                 "extra_nll": round(nll(engine, cv) - base_nll, 4)}
                for s in sorted(set(LOGIT_SCALES) | {f.default_scale}):
                    b = ls.bias(v * s)
                    row["logits"][f"{s:g}"] = {"shift": round(shift(engine, pairs, sign, bias=b) - base, 4),
                                               "extra_nll": round(nll(engine, bias=b) - base_nll, 4)}
                d = f"{f.default_scale:g}"
                res, lg = row["residual"][d]["shift"], row["logits"][d]["shift"]
                row["ratio_at_default"] = round(lg / res, 3) if res else None
                row["ratio_by_scale"] = {k: round(row["logits"][k]["shift"] / x["shift"], 3)
                                         for k, x in row["residual"].items() if x["shift"] and k in row["logits"]}
                match = [float(k) for k, x in row["logits"].items() if res > 0 and x["shift"] >= res]
                row["logit_scale_to_match"] = min(match) if match else None
                print(f"{f.key}: residual {res:+.3f} logits {lg:+.3f} at {d}; "
                      f"match at {row['logit_scale_to_match']}", file=sys.stderr)
                rows.append(row)
    summary = summarize(rows)
    out = {"model": info.model_id, "final_rms": round(ls.rms, 4), "tied_embeddings": ls.head.tied,
           "setup_s": round(setup_s, 2), "pairs": args.pairs, "base_nll": round(base_nll, 4),
           "summary": summary, "rows": rows, "wall_s": round(time.time() - t_start, 1)}
    print(json.dumps(out, indent=1))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
