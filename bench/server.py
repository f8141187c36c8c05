"""`morph serve` against the same engine called directly: TTFT and throughput, one JSON object.

    flock /tmp/morph-cpu.lock python -m bench.server [--threads 1] [--quick]

The server runs as a real `morph serve` process (private data dir, same model, threads
and context as the direct engine; its requests log, in that private dir, gives the
server's own share of the overhead); clients are threads in this process speaking
raw HTTP with keep-alive (httpx), so client-library overhead stays out of the figures.
The direct side is a LlamaEngine in this process, given the same Request the server
builds (morph's "continue" defaults, greedy), called from the same number of threads.

Prompts share a long prefix and differ in a short suffix, as requests with one system
prompt do: the engine reuses the cached prefix on both sides, so TTFT is mostly the
suffix, and the server's own cost is visible. TTFT: request sent (or `stream()` called)
-> first text received. tok/s: all completion tokens / wall time of the level.

At 1 client, direct and server requests alternate one by one, and `overhead_ms_p50` is
the median of the paired differences (target: <= 5 ms). At 4 and 16 clients each side
runs its clients together; the llama engine serves one stream at a time (FIFO in the
server, the engine's lock directly), so TTFT there includes waiting for the others.
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

import httpx

ROOT = Path(__file__).resolve().parents[1]

from morph import models, tasks
from morph.engine.base import Request
from morph.engine.llama import LlamaEngine

PREFIX = (
    "The town of Millbrook sits at the bend of a slow river, where the valley opens into wide "
    "fields of barley and rye. For most of its history it was a market town: farmers brought "
    "grain, wool and cheese on Thursdays, and traders from the coast came up the river road "
    "with salt, cloth and news. The following notes were written by visitors over the years."
)
N_GEN = 32


def prompt(i: int) -> str:
    return f"{PREFIX}\n\nNote {i}: The"


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# --- the two sides ---------------------------------------------------------------------------


class Direct:
    def __init__(self, engine):
        self.engine = engine
        self.kw = tasks.Defaults().sampling_for("continue") | {"temperature": 0.0}  # the server runs with a bare config

    def one(self, i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        ttft, n = None, 0
        for ev in self.engine.stream(Request(prompt=prompt(i), max_tokens=N_GEN, **self.kw)):
            if ev.text and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.done:
                n = ev.timings.gen_tokens
        return ttft, n


class Http:
    def __init__(self, url: str):
        self.url = url
        self.local = threading.local()

    def _client(self) -> httpx.Client:
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = httpx.Client(timeout=600)
        return c

    def one(self, i: int) -> tuple[float, int]:
        body = {"prompt": prompt(i), "max_tokens": N_GEN, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        ttft, n = None, 0
        with self._client().stream("POST", self.url + "/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if ttft is None and '"text":""' not in line and '"choices":[]' not in line:
                    ttft = time.perf_counter() - t0
                if '"choices":[]' in line:
                    n = json.loads(line[6:])["usage"]["completion_tokens"]
        return ttft, n


def level(side, clients: int, per_client: int, start: int) -> dict:
    ttfts, tokens, errors = [], [], []
    gate = threading.Barrier(clients)

    def run(c):
        try:
            gate.wait()
            for k in range(per_client):
                t, n = side.one(start + c * per_client + k)
                ttfts.append(t)
                tokens.append(n)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    ts = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(ttfts), "errors": errors,
            "ttft_p50_ms": round(pct(ttfts, 0.5) * 1000, 2), "ttft_p95_ms": round(pct(ttfts, 0.95) * 1000, 2),
            "total_tok_s": round(sum(tokens) / wall, 2), "wall_s": round(wall, 2)}


# --- the server process ---------------------------------------------------------------------


def start_server(threads: int, n_ctx: int, data: Path) -> tuple[subprocess.Popen, str]:
    data.mkdir(parents=True, exist_ok=True)
    (data / "config.toml").write_text(f"threads = {threads}\nn_ctx = {n_ctx}\n")
    env = dict(os.environ, MORPH_DATA_DIR=str(data), PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "morph", "serve", "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if not line.startswith("morph: serving "):
        p.kill()
        raise SystemExit(f"bench: error: server did not start: {line}{p.stderr.read()}")
    return p, line.split(" at ")[1].split()[0]


def inside_server_ms(data: Path, n: int) -> float | None:
    """Median, over the last `n` logged requests, of the server's own share of TTFT: request
    handler entered -> first chunk handed to the server, minus the engine's TTFT (its
    stream() call -> first token). The rest of the overhead is HTTP and the client."""
    import sqlite3

    time.sleep(1.0)  # the log is written by a background thread
    with sqlite3.connect(data / "morph.db") as db:
        rows = db.execute("SELECT timings FROM runs ORDER BY id DESC LIMIT ?", (n,)).fetchall()
    vals = []
    for (t,) in rows:
        t = json.loads(t)
        if t.get("server_first_byte_s") is not None and t.get("ttft_s") is not None:
            vals.append((t["server_first_byte_s"] - t["ttft_s"]) * 1000)
    return round(statistics.median(vals), 2) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="fewer requests per level")
    args = ap.parse_args()
    info = models.check(models.resolve(None))
    engine = LlamaEngine(info, n_ctx=args.n_ctx, threads=args.threads)
    direct = Direct(engine)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.threads, args.n_ctx, Path(tmp) / "data")
        try:
            http = Http(url)
            for side in (direct, http):  # warm both: prefix in the KV cache, connections open
                side.one(0)
            n1 = 12 if args.quick else 30
            pairs, d1, s1 = [], [], []
            t0 = time.perf_counter()
            for i in range(n1):  # 1 client: alternate, pair the differences
                (a, na), (b, nb) = direct.one(1000 + i), http.one(1000 + i)
                d1.append((a, na))
                s1.append((b, nb))
                pairs.append(b - a)
                print(f"1 client {i}: direct {a * 1000:.1f} ms, server {b * 1000:.1f} ms", file=sys.stderr)
            wall1 = time.perf_counter() - t0
            one = {
                "requests": n1,
                "direct": {"ttft_p50_ms": round(pct([a for a, _ in d1], 0.5) * 1000, 2),
                           "ttft_p95_ms": round(pct([a for a, _ in d1], 0.95) * 1000, 2)},
                "server": {"ttft_p50_ms": round(pct([b for b, _ in s1], 0.5) * 1000, 2),
                           "ttft_p95_ms": round(pct([b for b, _ in s1], 0.95) * 1000, 2)},
                "overhead_ms_p50": round(statistics.median(pairs) * 1000, 2),
                "overhead_ms_p95": round(pct(pairs, 0.95) * 1000, 2),
                "tokens_equal": [n for _, n in d1] == [n for _, n in s1],
                "wall_s_both": round(wall1, 2),
            }
            one["inside_server_ms_p50"] = inside_server_ms(Path(tmp) / "data", n1)
            levels = []
            for clients, per in ((1, 4 if args.quick else 8), (4, 2 if args.quick else 4), (16, 1 if args.quick else 2)):
                d = level(direct, clients, per, 10_000 * clients)
                s = level(http, clients, per, 10_000 * clients)
                print(f"{clients} clients: direct {d}, server {s}", file=sys.stderr)
                levels.append({"clients": clients, "direct": d, "server": s,
                               "ttft_p50_ratio": round(s["ttft_p50_ms"] / d["ttft_p50_ms"], 3),
                               "tok_s_ratio": round(s["total_tok_s"] / d["total_tok_s"], 3)})
        finally:
            proc.terminate()
            proc.wait(30)
    out = {"model": info.model_id, "threads": args.threads, "n_ctx": args.n_ctx, "n_gen": N_GEN,
           "load_avg_1m": round(os.getloadavg()[0], 2), "one_client_paired": one, "levels": levels,
           "target": {"overhead_ms_p50_max": 5.0, "met": one["overhead_ms_p50"] <= 5.0}}
    print(json.dumps(out, indent=1))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
