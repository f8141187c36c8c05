"""The sentence embedder's speed (morph/engine/embed.py): one JSON object on stdout.

- load_s: opening the converted GGUF (converted beforehand, not timed);
- one sentence: wall time of `embed_one` on a fresh text each repetition (no memo), for a
  short (12-word) and a 30-word sentence: p50, p95, max in ms;
- meaning check: `similarity(input, candidate)` with the input already embedded (what a
  product check of one candidate costs): p50, p95;
- ladder check: the rewrite ladder's whole meaning check (morph/choose.py: token-level F1
  against the input over all-MiniLM-L6-v2's token rows, and lexical retention) for an
  input and 6 candidates in one call; `per_candidate` is that over 6;
- batch: 512 different eval-like texts in one `embed` call, texts per second, for each
  `--batch-tokens` value.

The goal (issue 19): <= 20 ms for one sentence on 2 cores. Run it alone:

    flock -x /work/cpu.lock python bench/embed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SHORT = "Could you send me the quarterly report by Friday afternoon, if possible?"
LONG = ("Hey team, just a quick reminder that the budget sheet is due on Friday, so please fill in your "
        "travel costs before noon and ping me if anything looks off.")


def _ms(xs) -> dict:
    a = np.array(xs) * 1000
    return {"p50": round(float(np.median(a)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "max": round(float(a.max()), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--batch-tokens", default="512", help="comma-separated values to compare")
    args = ap.parse_args()
    from morph.engine import minilm
    from morph.engine.embed import Embedder
    from morph.eval.prompts import load_prompts

    path = minilm.model_path()  # convert first, outside the timings
    t0 = time.perf_counter()
    emb = Embedder(path, threads=args.threads, memo=0)
    load_s = time.perf_counter() - t0
    out = {"model": path.name, "threads": args.threads, "load_s": round(load_s, 3),
           "load1": round(os.getloadavg()[0], 2)}
    for name, base in (("short", SHORT), ("words30", LONG)):
        for i in range(3):
            emb.embed_one(f"{base} ({i})")
        ts = []
        for i in range(args.reps):
            text = f"{base} ({i + 3})"
            t = time.perf_counter()
            emb.embed_one(text)
            ts.append(time.perf_counter() - t)
        out[f"one_{name}_ms"] = {**_ms(ts), "tokens": len(emb.tokens(base))}
    emb.close()
    check = Embedder(path, threads=args.threads)  # memoised: the input is embedded once
    check.embed_one(LONG)
    ts = []
    for i in range(args.reps):
        t = time.perf_counter()
        check.similarity(LONG, f"{LONG} (v{i})")
        ts.append(time.perf_counter() - t)
    out["meaning_check_ms"] = _ms(ts)
    from morph import meaning
    from morph.choose import token_f1

    ts = []
    for i in range(args.reps):
        cands = [f"{LONG} (v{i}.{k})" for k in range(6)]
        t = time.perf_counter()
        token_f1(check, LONG, cands)
        for c in cands:
            meaning.retention(LONG, c)
        ts.append(time.perf_counter() - t)
    out["ladder_check_ms"] = _ms(ts)
    out["ladder_check_ms"]["per_candidate"] = round(out["ladder_check_ms"]["p50"] / 6, 2)
    check.close()
    texts = [p.text for p in load_prompts()]
    texts = [f"{texts[i % len(texts)]} ({i})" for i in range(512)]
    out["batch"] = {}
    for bt in (int(v) for v in args.batch_tokens.split(",")):
        e = Embedder(path, threads=args.threads, batch_tokens=bt, memo=0)
        e.embed(texts[:16])
        t = time.perf_counter()
        e.embed(texts)
        dt = time.perf_counter() - t
        out["batch"][str(bt)] = {"texts": len(texts), "tokens": sum(len(e.tokens(x)) for x in texts),
                                 "s": round(dt, 3), "texts_per_s": round(len(texts) / dt, 1)}
        e.close()
    out["load1_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
