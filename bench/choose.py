"""Steer, check, choose against one plain rewrite, end to end: one JSON object.

    flock -x /work/cpu.lock python -m bench.choose [--threads 2] [--inputs 8] [--reps 3] [--feature formal]

For each input (rewrite prompts of morph eval's tuning half, 20-40 words, the ~30-word
rewrite of issue 20), interleaved per repetition:

- `single`: one unsteered rewrite through `engine.stream` (greedy, the steer command's
  max_tokens), what `morph steer` without a feature costs (the system prompt's cells stay
  cached from the input before, which only makes `single` faster);
- `ladder`: `choose.run` with the feature at its defaults, what `morph steer -f FEATURE`
  costs: the ladder generated in one batch, every candidate's meaning and style checked,
  the choice made (the embedder already loaded, as in a session).

Wall seconds; `ratio` is ladder / single per input and repetition (its p50 is the figure
issue 20 bounds: <= 2). `check_s` is the part of the ladder spent after generation.

`--e2e`: the same comparison as a user runs it, one `morph steer` process each
(`--temperature 0` against `-f FEATURE`), start to exit: model load and imports included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from morph import choose, models, tasks
from morph.engine.embed import Embedder
from morph.engine.llama import LlamaEngine
from morph.eval.prompts import load_prompts
from morph.steering.catalog import Catalog


def _p(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs), 3), "max": round(xs[-1], 3), "n": len(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--feature", default="formal")
    ap.add_argument("--rungs", default=None, help="comma-separated rung names (default: all of choose.RUNGS)")
    ap.add_argument("--e2e", action="store_true", help="time `morph steer` processes instead")
    a = ap.parse_args()
    if a.e2e:
        return e2e(a)
    info = models.check(models.resolve(None))
    engine = LlamaEngine(info, n_ctx=2048, threads=a.threads)
    emb = Embedder(threads=a.threads)
    f = Catalog(info.model_id).get(a.feature)
    feature = choose.Feature(a.feature, f.load_vector(), tasks.style_phrase(f.name, f.description))
    texts = [p.text for p in load_prompts("tune", tasks=("rewrite",)) if 20 <= len(p.text.split()) <= 40][: a.inputs]
    rungs = choose.RUNGS if not a.rungs else tuple(r for r in choose.RUNGS if r.name in a.rungs.split(","))
    single, ladder, check, ratio, chosen = [], [], [], [], {}
    for _ in range(a.reps):
        for text in texts:
            n = tasks.rewrite_max_tokens(len(engine.tokenize(text)))
            t = time.perf_counter()
            for _e in engine.stream(tasks.build_request("rewrite", text, temperature=0.0, max_tokens=n)):
                pass
            s = time.perf_counter() - t
            t = time.perf_counter()
            c = choose.run(engine, emb, "rewrite", text, [feature], temperature=0.0, max_tokens=n, rungs=rungs)
            lad = time.perf_counter() - t
            single.append(s)
            ladder.append(lad)
            check.append(c.timings.total_s - c.timings.decode_s)
            ratio.append(lad / s)
            chosen[c.chosen.rung.name] = chosen.get(c.chosen.rung.name, 0) + 1
    out = {"bench": "choose", "feature": a.feature, "threads": a.threads, "inputs": len(texts),
           "words": [len(t.split()) for t in texts], "single_s": _p(single), "ladder_s": _p(ladder),
           "check_s": _p(check), "ratio": _p(ratio), "rungs": [r.name for r in rungs], "chosen": chosen,
           "goal_ratio_p50": 2.0, "met": statistics.median(ratio) <= 2.0,
           "loadavg_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(out, indent=1))
    return 0


def e2e(a) -> int:
    import subprocess
    import sys

    texts = [p.text for p in load_prompts("tune", tasks=("rewrite",)) if 20 <= len(p.text.split()) <= 40][: a.inputs]

    def run(args: list[str], text: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "morph", "steer", "--no-log", *args], input=text.encode(),
                       capture_output=True, check=True)
        return time.perf_counter() - t

    run(["--temperature", "0"], texts[0])  # the page cache and the embedder's one-time conversion
    run(["-f", a.feature], texts[0])
    single, ladder, ratio = [], [], []
    for _ in range(a.reps):
        for text in texts:
            s, lad = run(["--temperature", "0"], text), run(["-f", a.feature], text)
            single.append(s)
            ladder.append(lad)
            ratio.append(lad / s)
    print(json.dumps({"bench": "choose", "mode": "e2e", "feature": a.feature, "inputs": len(texts),
                      "single_s": _p(single), "ladder_s": _p(ladder), "ratio": _p(ratio),
                      "goal_ratio_p50": 2.0, "met": statistics.median(ratio) <= 2.0,
                      "loadavg_end": round(os.getloadavg()[0], 2)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
