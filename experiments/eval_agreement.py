"""`morph eval`'s batched generation against the product path (`engine.stream`).

The same (condition, prompt) requests are generated twice, each without a cache: one at
a time through `engine.stream` from a fresh KV cache (what `morph steer` prints; `morph
eval --sequential`) and many at a time through the batch runner (morph/engine/generate.py,
the default). Then, per condition and overall:

- identical: share of outputs whose token ids are identical;
- first_divergence: for outputs that differ, the first token index where they part;
- score deltas: the mean over outputs of batched - sequential concept score, relevance,
  NLL, and the largest difference of a condition's mean concept shift / relevance ratio
  / NLL ratio (what the goal is decided on);
- wall time of each path and their ratio (same engine, same threads, one run after the other).

Prints one JSON object (progress on stderr). Default: the first 10 report prompts per
task x 6 conditions (unsteered, prompting, and vectors at several scales and every
apply mode), 120 generations per path.

    flock /tmp/morph-cpu.lock python -m experiments.eval_agreement --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

DEFAULT_CONDITIONS = (
    "unsteered",
    "prompt formal",
    "diffmean formal 1 all",
    "sae formal 1.5 generated",
    "diffmean concise 1 prompt-scaled:0.5",
    "sae poetic 2 all",
)


def parse_condition(text: str):
    from morph.eval.plan import Condition

    parts = text.split()
    if parts[0] == "unsteered":
        return Condition("unsteered")
    if parts[0] == "prompt":
        return Condition("prompt", parts[1])
    kind, concept, x, apply = parts
    return Condition(kind, concept, float(x), apply)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-task", type=int, default=10, help="report prompts per task")
    ap.add_argument("--split", default="report")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--condition", action="append", default=None,
                    help="'unsteered' | 'prompt CONCEPT' | 'KIND CONCEPT SCALE_X APPLY' (repeatable)")
    args = ap.parse_args()

    from morph import models
    from morph.engine.llama import LlamaEngine
    from morph.eval import plan, prompts, run
    from morph.eval.judge import Embedder, Judge
    from morph.steering.catalog import Catalog

    conds = [parse_condition(c) for c in (args.condition or DEFAULT_CONDITIONS)]
    info = models.check(models.resolve(None))
    catalog = Catalog(info.model_id)
    concepts = sorted({c.concept for c in conds if c.concept})
    judge = Judge(Embedder(threads=args.threads))
    targets = plan.targets_from_catalog(catalog, concepts, judge.poles(), n_embd=info.n_embd, n_layer=info.n_layer)
    sample = prompts.load_prompts(args.split, limit=args.per_task)
    engine = LlamaEngine(info, n_ctx=2048, threads=args.threads)
    res, wall = {}, {}
    cache = run.Cache(None)  # in memory: each path's outputs (keyed apart), reused by the scoring below
    try:
        for mode in ("sequential", "batched"):
            print(f"bench: {mode}", file=sys.stderr)
            t0 = time.perf_counter()
            by = {t.concept: t for t in targets}
            jobs = [(p, c, plan.build(p, c, by.get(c.concept))) for c in conds for p in sample]
            run.generate(engine, jobs, cache, progress=True, sequential=mode == "sequential")
            wall[mode] = time.perf_counter() - t0
        # the scores (not timed): the same evaluate() the eval runs, generations from the cache
        for mode in ("sequential", "batched"):
            res[mode] = run.evaluate(engine, judge, targets, sample, conds, cache, progress=False,
                                     sequential=mode == "sequential")
    finally:
        engine.close()

    seq, bat = res["sequential"]["outputs"], res["batched"]["outputs"]
    per: dict[str, dict] = {}
    firsts, same_all = [], []
    for a, b in zip(seq, bat):
        assert (a["prompt"], a["condition"]) == (b["prompt"], b["condition"])
        same = a["text"] == b["text"] and a["n_tokens"] == b["n_tokens"]
        d = per.setdefault(f"{b['concept']} {b['condition']}".strip(), {"n": 0, "identical": 0, "first_divergence": []})
        d["n"] += 1
        d["identical"] += int(same)
        same_all.append(same)
        if not same:
            k = next((i for i, (x, y) in enumerate(zip(a["text"], b["text"])) if x != y), min(len(a["text"]), len(b["text"])))
            d["first_divergence"].append(k)
            firsts.append(k)

    def delta(key):
        xs = [b[key] - a[key] for a, b in zip(seq, bat)
              if a.get(key) is not None and b.get(key) is not None and np.isfinite(a[key]) and np.isfinite(b[key])]
        return round(float(np.mean(xs)), 5) if xs else None

    rows_a = {(r["concept"], r["condition"]): r for r in res["sequential"]["rows"]}
    row_delta = {}
    for r in res["batched"]["rows"]:
        a = rows_a[(r["concept"], r["condition"])]
        for k in ("concept_shift", "relevance_ratio", "nll_ratio", "hmean"):
            if r[k] is not None and a[k] is not None:
                row_delta[k] = max(row_delta.get(k, 0.0), abs(r[k] - a[k]))
    out = {
        "prompts": len(sample), "conditions": [c.key + (f" {c.concept}" if c.concept else "") for c in conds],
        "generations_per_path": len(seq), "threads": args.threads,
        "identical": round(float(np.mean(same_all)), 4),
        "first_divergence_chars": {"n": len(firsts), "median": float(np.median(firsts)) if firsts else None,
                                   "min": min(firsts) if firsts else None},
        "mean_delta_per_output": {k: delta(k) for k in ("concept_score", "relevance", "nll", "repetition")},
        "max_abs_delta_of_row_means": {k: round(v, 5) for k, v in row_delta.items()},
        "per_condition": {k: {"n": v["n"], "identical": v["identical"],
                              "first_divergence_chars": v["first_divergence"]} for k, v in per.items()},
        "wall_s": {k: round(v, 1) for k, v in wall.items()},
        "speedup_batched": round(wall["sequential"] / wall["batched"], 2),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
