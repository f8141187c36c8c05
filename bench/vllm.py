"""Decode speed of the vLLM engine: no hooks, hooks with zero vectors, steered; batch 1 and 16.

Prints one JSON object. Ratios are taken within this one run, conditions interleaved and
repeated (best of reps), so a busy neighbour hurts every condition alike. Target: the
hooks cost <= 2% (hooks_zero vs no_hooks).

    OMP_NUM_THREADS=2 VLLM_CPU_OMP_THREADS_BIND=0-1 flock /tmp/morph-cpu.lock python -m bench.vllm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

PROMPTS = [
    "The old lighthouse keeper climbed the stairs and",
    "Dear team, I wanted to follow up on",
    "In the middle of the night, the train stopped",
    "The recipe calls for three cups of flour, and",
    "Our quarterly results show that",
    "She opened the letter slowly, knowing that",
    "The museum's new exhibit explores",
    "When the power went out, everyone in the office",
]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--feature", default="formal")
    return ap.parse_args()


def batch_figures(res: dict[str, list[float]]) -> dict:
    """Best of the repetitions per condition, and the hooks' cost against no hooks."""
    best = {c: max(v) for c, v in res.items()}
    return {
        "tok_per_s": {c: round(v, 2) for c, v in best.items()},
        "all_reps": {c: [round(x, 2) for x in v] for c, v in res.items()},
        "hook_cost_zero": round(1 - best["hooks_zero"] / best["no_hooks"], 4),
        "hook_cost_unsteered": round(1 - best["hooks_unsteered"] / best["no_hooks"], 4),
        "steered_cost": round(1 - best["steered"] / best["no_hooks"], 4),
    }


def main() -> None:
    a = parse_args()

    import numpy as np

    from morph import runtime
    from morph.engine.base import Request
    from morph.engine.vllm import VllmEngine
    from morph.engine.vllm_plugin import rpc_set_hooks
    from morph.engine.wire import vector_key
    from morph.errors import MorphError
    from morph.steering.catalog import Catalog

    try:
        info = runtime.model_info(a.model, gpu=True)
        t0 = time.perf_counter()
        eng = VllmEngine(info, n_ctx=512, max_num_seqs=max(a.batch))
        load_s = time.perf_counter() - t0
        feat = Catalog(info.model_id).get(a.feature, experimental=True)
    except MorphError as e:
        sys.exit(f"bench/vllm.py: {e}")
    cv = feat.load_vector() * feat.default_scale
    zero = np.zeros((info.n_layer, info.n_embd), np.float32)
    zero_args = {"key": vector_key(zero) + "-zero", "vector": zero.tobytes(), "apply": "all"}
    steer_args = eng._steer_args(cv, "all")

    def run_batch(n: int, morph_args) -> float:
        """Total generated tokens / wall time for n concurrent requests (greedy, no EOS stop)."""
        done = []
        go = threading.Barrier(n + 1)

        def one(i):
            req = Request(prompt=PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens=a.tokens, temperature=0.0)
            params = eng._params(req, a.tokens, morph_args)
            params.ignore_eos = True
            toks = eng.tokenize(req.prompt)
            go.wait()
            k = 0
            for out in eng._run(toks, params):
                k += len(out.outputs[0].token_ids)
            done.append(k)

        ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        go.wait()
        t1 = time.perf_counter()
        for t in ts:
            t.join()
        return sum(done) / (time.perf_counter() - t1)

    conds = ["no_hooks", "hooks_unsteered", "hooks_zero", "steered"]

    def set_hooks(on: bool) -> None:
        eng._driver.call(lambda e: e.collective_rpc(rpc_set_hooks, args=(on,)))

    res = {b: {c: [] for c in conds} for b in a.batch}
    run_batch(2, None)  # warm-up
    for _ in range(a.reps):
        for b in a.batch:
            for c in conds:
                set_hooks(c != "no_hooks")
                args = {"hooks_zero": zero_args, "steered": steer_args}.get(c)
                res[b][c].append(run_batch(b, args))
    set_hooks(True)
    out = {
        "engine": "vllm", "model": info.model_id, "device": "cpu" if eng.llm.llm_engine.vllm_config.device_config.device_type == "cpu" else "cuda",
        "threads": os.environ.get("OMP_NUM_THREADS"), "tokens_per_request": a.tokens, "reps": a.reps,
        "load_s": round(load_s, 1), "feature": feat.key,
    }
    out |= {f"batch{b}": batch_figures(res[b]) for b in a.batch}
    print(json.dumps(out, indent=2))
    eng.close()


if __name__ == "__main__":
    main()
