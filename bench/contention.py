"""A shared CPU: decode speed and TTFT of one morph engine process alone, and of two
generating at the same time, under several thread settings. One JSON object on stdout.

    python -m bench.contention [--reps 5] [--seconds 8] [--variants today,passive,...]

llama.cpp here is built with OpenMP: its worker threads meet at an OpenMP barrier after
every op, and libgomp's default is to spin ~300k times (a few ms) at a barrier before
sleeping. When two processes share two cores, a thread spins while the thread it waits
for is off the CPU. Each variant is threads, adaptive threads on or off
(engine/llamacpp.ThreadGovernor) and libgomp's environment, set in the child's environment
before llama.cpp's library loads:

- `today`: 2 threads, not adaptive, libgomp's defaults (GOMP_SPINCOUNT=300000 is
  libgomp's own default with OMP_WAIT_POLICY unset, written out so nothing else applies);
- `passive`: `today` with OMP_WAIT_POLICY=passive (a waiting thread sleeps at once);
- `spinN`: `today` with GOMP_SPINCOUNT=N (spin N times, then sleep);
- `threads1`: 1 thread (no barriers at all);
- `adaptive`: `today` with adaptive threads;
- `shipped`: nothing set: morph's defaults (2 threads here: the cores it may use).

Each repetition runs every variant alone (one process) and as a pair (two processes
started together, each generating for `--seconds`); the order of the variants rotates
per repetition. A process loads the engine, warms up, then generates requests of a
~70-token prompt (a distinct first line, so little prefix is reused) and 64 greedy
tokens until the window ends (the last request is cancelled there). Per process: decode
tok/s = tokens after the first / time from first to last, summed over its requests;
TTFT = the median over its requests. Figures: medians over repetitions; `pair_sum` is
the two processes' decode rates added; `pair_share` = pair_sum / the same variant alone
(goal >= 0.8), `alone_vs_today` = alone / today's alone, paired per repetition (goal
>= 0.95). Run it under an exclusive lock on a shared machine:
`flock -x /work/cpu.lock python -m bench.contention`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN_TOKENS = 64
PROMPT = (
    "The harbour was quiet that morning. Fishing boats lay against the stone wall, their nets "
    "piled on the decks, and gulls waited on the posts for the first catch of the day. An old "
    "man in a blue coat walked slowly along the pier, stopping now and then to look at the sea, "
    "as if he expected someone to arrive."
)
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def variant(name: str) -> tuple[int | None, bool | None, dict[str, str]]:
    """(threads, adaptive, environment) for a variant name (see the module docstring)."""
    today = {"GOMP_SPINCOUNT": "300000"}
    if name == "today":
        return 2, False, today
    if name == "passive":
        return 2, False, {"OMP_WAIT_POLICY": "passive"}
    if name.startswith("spin") and name[4:].isdigit():
        return 2, False, {"GOMP_SPINCOUNT": name[4:]}
    if name.startswith("threads") and name[7:].isdigit():
        return int(name[7:]), False, today
    if name == "adaptive":
        return 2, True, today
    if name == "shipped":
        return None, None, {}
    raise SystemExit(f"bench: error: unknown variant {name!r}")


# --- child: one morph engine process ---------------------------------------------------


def child(threads: int | None, adaptive: bool | None, seconds: float) -> None:
    from morph import models
    from morph.engine.base import Request
    from morph.engine.llama import LlamaEngine  # imports engine/llamacpp.py before llama_cpp loads

    eng = LlamaEngine(models.check(models.resolve(None)), n_ctx=512, threads=threads, adaptive_threads=adaptive)
    n = 0

    def request(cancel=None):
        nonlocal n
        n += 1
        req = Request(prompt=f"Note {n * 7919 % 10007}.\n{PROMPT}", max_tokens=GEN_TOKENS, temperature=0.0,
                      cancel=cancel)
        for ev in eng.stream(req):
            if ev.done:
                return ev.timings

    request()  # warm-up: page the weights in, build the graphs
    print(json.dumps({"ready": True, "threads": eng.threads}), flush=True)
    sys.stdin.readline()  # "go": every process of the run starts together
    cancel = threading.Event()
    timer = threading.Timer(seconds, cancel.set)
    timer.start()
    rows = []
    while not cancel.is_set():
        t = request(cancel)
        if t is not None and t.gen_tokens > 1:
            rows.append((t.gen_tokens - 1, t.decode_s, t.ttft_s))
    timer.cancel()
    eng.close()
    tokens, decode_s = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(json.dumps({"decode_tok_s": tokens / decode_s if decode_s else 0.0,
                      "ttft_s": statistics.median(r[2] for r in rows) if rows else None,
                      "requests": len(rows), "tokens": tokens}), flush=True)


# --- parent ----------------------------------------------------------------------------


def run(name: str, procs: int, seconds: float, data_dir: str) -> list[dict]:
    threads, adaptive, extra = variant(name)
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(extra, PYTHONPATH=str(ROOT), MORPH_DATA_DIR=data_dir)  # this checkout's morph, no user config
    cmd = [sys.executable, "-m", "bench.contention", "--child", "--seconds", str(seconds)]
    if threads:
        cmd += ["--threads", str(threads)]
    if adaptive is not None:
        cmd += ["--adaptive", "on" if adaptive else "off"]
    ps = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
          for _ in range(procs)]
    try:
        for p in ps:  # every process loaded and warmed up before any starts
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"{name}: a child died before it was ready (exit {p.wait()})")
        for p in ps:
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for p in ps:
            line = p.stdout.readline()
            if p.wait(timeout=seconds + 120) != 0 or not line:
                raise RuntimeError(f"{name}: a child failed (exit {p.returncode})")
            out.append(json.loads(line))
        return out
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait()


def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def main() -> None:
    from morph.doctor import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0, help="generation window per run")
    ap.add_argument("--variants", default="today,passive,threads1,adaptive,shipped")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--adaptive", choices=("on", "off"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.threads, None if a.adaptive is None else a.adaptive == "on", a.seconds)
    names = a.variants.split(",")
    for n in names:
        variant(n)
    samples = {n: {"alone": [], "pair": []} for n in names}
    with tempfile.TemporaryDirectory(prefix="morph-bench-contention-") as data_dir:
        for rep in range(a.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for n in order:
                for kind, procs in (("alone", 1), ("pair", 2)):
                    r = run(n, procs, a.seconds, data_dir)
                    samples[n][kind].append(r)
                    rates = ", ".join(f"{x['decode_tok_s']:.1f}" for x in r)
                    ttfts = ", ".join(f"{x['ttft_s'] or 0:.3f}" for x in r)
                    print(f"[bench] rep {rep + 1} {n} {kind}: decode {rates} tok/s, ttft {ttfts} s",
                          file=sys.stderr, flush=True)
    today = samples.get("today", {}).get("alone")
    result = {}
    for n in names:
        alone = [r[0]["decode_tok_s"] for r in samples[n]["alone"]]
        pair_sum = [sum(x["decode_tok_s"] for x in r) for r in samples[n]["pair"]]
        row = {
            "threads": variant(n)[0] or "default",
            "adaptive": "default" if variant(n)[1] is None else variant(n)[1],
            "env": variant(n)[2],
            "alone_decode_tok_s": med(alone),
            "alone_ttft_s": med(r[0]["ttft_s"] for r in samples[n]["alone"]),
            "pair_decode_tok_s_each": med(x["decode_tok_s"] for r in samples[n]["pair"] for x in r),
            "pair_sum_decode_tok_s": med(pair_sum),
            "pair_ttft_s": med(x["ttft_s"] for r in samples[n]["pair"] for x in r),
            "pair_share": med(s / a1 for s, a1 in zip(pair_sum, alone)),
            "samples": {"alone": [round(x, 1) for x in alone], "pair_sum": [round(x, 1) for x in pair_sum]},
        }
        if today:
            row["alone_vs_today"] = med(x / t[0]["decode_tok_s"] for x, t in zip(alone, today))
            row["pair_sum_vs_today_alone"] = med(s / t[0]["decode_tok_s"] for s, t in zip(pair_sum, today))
        result[n] = row
    print(json.dumps({
        "bench": "contention",
        "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
                    "load_avg_end": os.getloadavg()},
        "reps": a.reps, "seconds": a.seconds, "gen_tokens": GEN_TOKENS,
        "goal": {"pair_share": ">= 0.8", "alone_vs_today": ">= 0.95"},
        "variants": result,
    }, indent=2))


if __name__ == "__main__":
    main()
