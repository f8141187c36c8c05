"""Batched generation (morph/engine/generate.py): a ladder of candidates, one JSON object.

    flock -x /work/cpu.lock python -m bench.batch [--threads 1] [--reps 5] [--tokens 48]

A ladder as issue 20 plans it for a ~30-word rewrite: `--rungs` candidates on the plain
rewrite prompt (unsteered, then the formal feature at rising strengths, steering only the
generated tokens so that all of them share the prompt's KV), and two on a prompt with a
style instruction (plain, and with the vector). Per repetition, interleaved:

- `shared`: one `generate` call, jobs with the same prompt and prompt steering sharing one
  prefill (the KV copied, the first token's logits reused);
- `separate`: the same call with `share_prefill=False` (every job evaluates its prompt);
- `single`: one unsteered rewrite through `engine.stream` from a fresh cache, the cost
  issue 20 compares a ladder with (its target: ladder p50 <= 2x a single rewrite).

Figures are medians of wall seconds; the outputs of `shared` and `separate` must be the
same tokens (`identical`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

from morph import models, paths, tasks
from morph.engine.base import collect
from morph.engine.generate import Job, generate, runner_for
from morph.engine.llama import LlamaEngine
from morph.steering.vector import ControlVector

TEXT = ("hey team, the launch moved to next thursday because the payment provider needs two more days "
        "to finish their checks, so please update your calendars and tell customers who asked.")


def ladder(engine, rungs: int, tokens: int) -> list[Job]:
    cv = ControlVector.load(paths.shipped_vectors_dir() / engine.info.model_id / "formal.gguf")
    plain = Job.from_request(engine, tasks.build_request("rewrite", TEXT, temperature=0.0, max_tokens=tokens))
    styled = Job.from_request(engine, tasks.build_request("rewrite", TEXT, style="in a formal register",
                                                          temperature=0.0, max_tokens=tokens))
    jobs = [plain] + [replace(plain, steering=cv * (0.1 * i), apply="generated") for i in range(1, rungs)]
    return jobs + [styled, replace(styled, steering=cv * 0.1, apply="generated")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rungs", type=int, default=5, help="candidates on the plain prompt")
    a = ap.parse_args()
    info = models.check(models.resolve(None))
    engine = LlamaEngine(info, n_ctx=2048, threads=a.threads)
    jobs = ladder(engine, a.rungs, a.tokens)
    single = tasks.build_request("rewrite", TEXT, temperature=0.0, max_tokens=a.tokens)
    times: dict[str, list[float]] = {"shared": [], "separate": [], "single": []}
    outs = {}
    with runner_for(engine, jobs) as runner:
        generate(runner, jobs[:2])  # warm-up: graphs, pages
        for _ in range(a.reps):
            for name, share in (("shared", True), ("separate", False)):
                t0 = time.perf_counter()
                outs[name] = [o.ids for o in generate(runner, jobs, share_prefill=share)]
                times[name].append(time.perf_counter() - t0)
            engine.reset_cache()
            t0 = time.perf_counter()
            collect(engine.stream(single))
            times["single"].append(time.perf_counter() - t0)
    engine.close()
    med = {k: round(statistics.median(v), 4) for k, v in times.items()}
    report = {
        "bench": "batch",
        "config": {"threads": a.threads, "reps": a.reps, "tokens": a.tokens, "jobs": len(jobs),
                   "prompt_tokens": sorted({len(j.tokens) for j in jobs}),
                   "prompts": len({tuple(j.tokens) for j in jobs})},  # shared: one prefill each
        "median_s": med,
        "shared / separate": round(med["shared"] / med["separate"], 3),
        "shared / single": round(med["shared"] / med["single"], 3),
        "identical": outs["shared"] == outs["separate"],
        "samples_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
