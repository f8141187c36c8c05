"""Engine speed: morph's LlamaEngine against raw llama.cpp (`llama-bench`), one JSON object.

    python -m bench.engine [--quick] [--no-raw] [--model PATH|NAME]

Everything is measured in one run and interleaved (each repetition runs raw llama-bench,
then every morph figure, then one `morph steer` process), so a busy neighbour hits both
sides alike; ratios are taken from the medians of that same run. Progress goes to stderr,
the JSON to stdout. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

from bench import _llama_bench
from morph import models
from morph.errors import MorphError
from morph.engine.base import Request
from morph.engine.llama import LlamaEngine
from morph.engine.llamacpp import default_threads, extra_buffer_types
from morph.steering.vector import ControlVector, residual_relative

N_PROMPT = 512  # like llama-bench pp512 (the prompt is cut to at most this many tokens)
N_GEN = 128  # like llama-bench tg128
STEER_BLOCK = 15  # a middle block of SmolLM2's 30 (clamped for other models)
STEER_FRACTION = 0.1
APPEND_TOKENS = 9  # what each append below evaluates (checked: append_evaluated_tokens)
RAW_TIMEOUT_S = 180  # one llama-bench test takes ~2-4 s on an idle 2-core machine  # of the block's median residual norm
APPENDS = [  # ~7 tokens each, appended one after another to the cached prompt
    " The last train left before anyone noticed.",
    " Nobody on the platform said a word.",
    " Then the lights in the station went out.",
    " A dog barked somewhere behind the gate.",
    " We waited there until the sun came up.",
]
SHORT_PROMPT = "Here is a long story about a lighthouse keeper and the sea. Chapter 1.\n\n"
STEER_INPUT = "hey, can u send me the report by friday? thx\n"

# Plain expository prose: a prompt that reads like a user's document, ~540 tokens uncut.
BODY = """\
The town of Millbrook sits at the bend of a slow river, where the valley opens into wide \
fields of barley and rye. For most of its history it was a market town: farmers brought \
grain, wool and cheese on Thursdays, and traders from the coast came up the river road \
with salt, cloth and news. The old market hall still stands in the square, its stone \
arches worn smooth by centuries of carts and hands. In the nineteenth century a railway \
line reached the valley, and with it came a brick mill, a tannery and rows of narrow \
houses for the workers. The mill ran for almost a hundred years, spinning cotton that \
arrived by train and leaving as thread and cloth for cities far away. When it closed, \
the town lost a third of its jobs in a single winter, and many families moved south in \
search of work. Those who stayed turned to what they had: the river, the fields and the \
long memory of the place. A group of teachers started a small museum in the mill's old \
office, collecting photographs, ledgers and tools from attics across the valley. A baker \
reopened the oven behind the market hall and began selling rye bread made the way her \
grandmother had made it. Walkers discovered the river path, and a few guest houses \
opened along it. Today Millbrook is neither rich nor poor. Its population is smaller than \
it was a century ago, but the school is full again, and the Thursday market has returned, \
selling honey, apples, knitted hats and secondhand books alongside the cheese. Visitors \
often ask what makes the town worth the journey, and the answers vary. Some point to the \
market hall at dawn, when the light comes through the arches and the traders set out \
their tables. Others mention the museum, where a retired weaver demonstrates the last \
working loom every Saturday morning. Many simply say that the town feels unhurried, as \
if it had decided long ago that it would not be rushed by anyone. The council has plans \
for a new bridge and a cycle route to the next village, though nobody expects them to \
be finished soon. Meanwhile the river keeps its own pace, rising in spring, falling in \
late summer, and carrying the same quiet sound past the mill that it carried before the \
first stone was laid. Local historians like to say that every generation in Millbrook \
has believed it was living at the end of something, and every generation has been \
wrong. The records in the museum show floods, fires, failed harvests and a cholera \
outbreak, yet the market has always come back. Children still learn to swim in the \
shallow pool below the weir, and old men still argue about the weather on the bench \
outside the post office. Whether the town will grow again is an open question. For now \
it is enough that the lights are on in the market hall, that bread is baking before \
dawn, and that the river, as always, is running toward the sea."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def best(xs, lowest=False):
    """Best sample: noise from other processes only ever slows a run down, so on a shared
    machine the fastest of N runs estimates the machine's own speed."""
    xs = [x for x in xs if x is not None]
    return (min(xs) if lowest else max(xs)) if xs else None


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPU time spent busy over `interval` (anyone's), from /proc/stat."""
    def read():
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle

    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(limit_s: float, threshold: float = 0.2) -> float:
    """Wait (up to limit_s) until other processes leave the CPUs mostly idle; the last busy fraction."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return round(busy, 3)


def ratio(a, b):
    return round(a / b, 4) if a and b else None


# --- morph side ----------------------------------------------------------------------


def timed_stream(engine, req: Request) -> dict:
    """Run one request, timing from the consumer's side (what a caller actually sees).

    ttft_s: stream() called -> first event carrying a token (the engine evaluates the
    token before yielding it, so this includes one decode step).
    decode_tok_s: tokens delivered after the first / time between first and last delivery.
    """
    t0 = time.perf_counter()
    t_first = t_last = None
    n_tok = 0
    timings = None
    for ev in engine.stream(req):
        now = time.perf_counter()
        if ev.token_ids:
            if t_first is None:
                t_first = now
            else:
                n_tok += len(ev.token_ids)
            t_last = now
        if ev.done:
            timings = ev.timings
    tm = timings.as_dict() if timings else {}
    out = {
        "ttft_s": round(t_first - t0, 5) if t_first else None,
        "decode_tok_s": round(n_tok / (t_last - t_first), 2) if n_tok and t_last > t_first else None,
        "prompt_tokens": tm.get("prompt_tokens"),
        "evaluated_tokens": tm.get("evaluated_tokens"),
        "gen_tokens": tm.get("gen_tokens"),
        "engine_ttft_s": tm.get("ttft_s"),
        "engine_tok_s": tm.get("tok_per_s"),
    }
    if timings and timings.evaluated_tokens and timings.prompt_s > 0:
        out["prompt_tok_s"] = round(timings.evaluated_tokens / timings.prompt_s, 2)
    return out


def greedy(prompt: str, max_tokens: int, steering=None, apply: str = "all") -> Request:
    return Request(prompt=prompt, max_tokens=max_tokens, temperature=0.0, steering=steering, apply=apply)


def long_prompt(engine, tag: str) -> str:
    """BODY cut (at a word boundary) to at most N_PROMPT tokens, with a per-run first line.

    The tag differs per run so the cached KV shares no prefix with it: a cold prompt.
    """
    words = BODY.split(" ")
    text = f"{tag}\n\n{BODY}"
    while len(engine.tokenize(text)) > N_PROMPT:
        words = words[:-5]
        text = f"{tag}\n\n" + " ".join(words)
    return text


def median_norms(engine, blocks: list[int]) -> dict[int, float]:
    """Median per-token residual norm at each block (capture context, not the generator)."""
    out = {}
    last = engine.n_layer - 1
    for b in blocks:
        # The last block's l_out holds only the output row (llama.cpp drops the others
        # there), so capture gives nothing: use the block before it.
        acts = engine.capture([BODY[:600]], min(b, last - 1))[0]
        out[b] = float(np.median(np.linalg.norm(acts, axis=1)))
    return out


def random_vector(engine, blocks: list[int], seed: int = 0) -> ControlVector:
    rng = np.random.default_rng(seed)
    norms = median_norms(engine, blocks)
    dirs = {
        b: residual_relative(rng.standard_normal(engine.n_embd).astype(np.float32), norms[b] * STEER_FRACTION)
        for b in blocks
    }
    return ControlVector(dirs, engine.info.hint, {"morph.note": "bench: random direction"})


# --- raw side ------------------------------------------------------------------------


def run_llama_bench(exe: Path, model: Path, threads: int, p: int, n: int, d: int = 0) -> dict:
    """One llama-bench test (one repetition, after its own warm-up run); its JSON row."""
    # --repack: llama-bench's switch for extra buffer types; the same decision as morph's loads
    # (off on AMX CPUs, where they crash: engine/llamacpp.py)
    cmd = [str(exe), "-m", str(model), "-p", str(p), "-n", str(n), "-d", str(d),
           "-fa", "1", "-t", str(threads), "-r", "1", "-o", "json", "--repack", str(int(extra_buffer_types()))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=RAW_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TimeoutError(
            f"llama-bench took over {RAW_TIMEOUT_S} s: the CPUs are busy (2-thread runs collapse when "
            "another process holds a core); rerun when idle, with --wait-idle, or with --threads 1"
        ) from None
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    rows = json.loads(proc.stdout)
    if len(rows) != 1:
        raise RuntimeError(f"llama-bench gave {len(rows)} rows for one test")
    return rows[0]


# --- `morph steer` process start ---------------------------------------------------------


def steer_first_byte(argv: list[str], env: dict) -> dict:
    """Process start -> first byte on stdout, and -> exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdin.write(STEER_INPUT.encode())
    p.stdin.close()
    first = p.stdout.read(1)
    t_first = time.perf_counter()
    rest = p.stdout.read()
    err = p.stderr.read()
    rc = p.wait()
    t_end = time.perf_counter()
    return {
        "first_byte_s": round(t_first - t0, 4) if first else None,
        "exit_s": round(t_end - t0, 4),
        "rc": rc,
        "stdout_bytes": len(first) + len(rest),
        "stderr_tail": err.decode("utf-8", "replace").strip()[-200:] if rc else "",
    }


def steer_argv(info, tmp: Path, cv: ControlVector) -> tuple[list[str], str]:
    """`morph steer -f formal` when that feature exists, else `--vector <random file>`."""
    exe = shutil.which("morph", path=str(Path(sys.executable).parent)) or shutil.which("morph")
    base = [exe] if exe else [sys.executable, "-m", "morph"]
    base += ["--model", str(info.file.path), "steer", "--no-log", "--temperature", "0", "--max-tokens", "16"]
    try:
        from morph.steering.catalog import Catalog

        Catalog(info.model_id).get("formal", experimental=True)
        # --no-choose: one streamed rewrite, the engine's path (the ladder's cost: bench/choose.py)
        return base + ["--experimental", "-f", "formal", "--no-choose"], "morph steer --experimental -f formal --no-choose"
    except Exception:
        path = tmp / "random.gguf"
        cv.save(path)
        return base + ["--vector", str(path)], "morph steer --vector <random 1-block vector> (no 'formal' feature installed)"


# --- main ----------------------------------------------------------------------------------


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_available": default_threads(),
        "cores_total": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5, --quick 2)")
    ap.add_argument("--no-raw", action="store_true", help="skip llama-bench (no build, no raw figures)")
    ap.add_argument("--model", default=None, help="model path or name (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=None, help="default: available cores")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each repetition wait up to S seconds for the CPUs to be idle "
                         "(shared machines; the busy fraction seen is recorded)")
    return ap.parse_args()


class Samples:
    """Every figure of every repetition: morph's (`s`) and raw llama-bench's (`raw_s`)."""

    def __init__(self, exe, info, threads: int):
        self.exe, self.info, self.threads = exe, info, threads
        self.s = {k: [] for k in ("cold", "append", "append_gen", "decode_d0", "decode_d0_steer1",
                                  "decode_d0_steerall", "decode_d0_steer1_gen", "cold_steer1", "steer_process")}
        self.raw_s = {k: [] for k in ("pp_d0", "tg_d0", "tg_d512", "pp_append")}  # per repetition, tok/s
        self.raw_rows: list[dict] = []
        self.raw_timeouts: list[str] = []
        self.loads: list[float] = []
        self.busy: list[float] = []  # CPU busy fraction just before each repetition (--wait-idle)
        self.rep = 0

    def raw(self, key: str, p: int, n: int, d: int = 0) -> None:
        if self.exe is None:
            return
        try:
            row = run_llama_bench(self.exe, self.info.file.path, self.threads, p, n, d)
        except TimeoutError as e:  # a busy machine: lose this sample, keep the run
            log(f"warning: {e}")
            self.raw_timeouts.append(f"rep {self.rep}: p{p} n{n} d{d}")
            return
        row["rep"] = self.rep
        self.raw_rows.append(row)
        self.raw_s[key][-1].append(row["avg_ts"])

    def col(self, name, key):
        return [x.get(key) for x in self.s[name]]

    def repetition(self, engine, cv_one, cv_all, steer) -> None:
        """One repetition. Each raw test runs right next to the morph figure it is compared
        with: on a shared machine the load changes within seconds, so coarser interleaving
        compares noise."""
        s, raw = self.s, self.raw
        for v in self.raw_s.values():
            v.append([])
        prompt = long_prompt(engine, f"Notes, part {self.rep + 1}.")
        # Cold prompt (no shared prefix), then decode at depth ~N_PROMPT.
        raw("pp_d0", N_PROMPT, 0)
        s["cold"].append(timed_stream(engine, greedy(prompt, N_GEN)))
        raw("tg_d512", 0, N_GEN, N_PROMPT)
        # Appends to the cached prompt: only the new tokens are evaluated.
        text = prompt
        for a in APPENDS:
            text += a
            s["append"].append(timed_stream(engine, greedy(text, 1)))
        # The same appends steered on the generated tokens only (the editor's ghost text):
        # the prompt's cells stay unsteered, so the vector is cleared and set again per request.
        for a in APPENDS:
            text += a
            s["append_gen"].append(timed_stream(engine, greedy(text, 1, cv_one, "generated")))
        # Raw floor for an append: llama.cpp evaluating that many tokens on a cached prompt.
        raw("pp_append", APPEND_TOKENS, 0, N_PROMPT)
        # Decode from a short prompt (depth ~0, like tg128), plain and steered, between two raw runs.
        raw("tg_d0", 0, N_GEN)
        s["decode_d0"].append(timed_stream(engine, greedy(SHORT_PROMPT, N_GEN)))
        s["decode_d0_steer1"].append(timed_stream(engine, greedy(SHORT_PROMPT, N_GEN, cv_one)))
        s["decode_d0_steerall"].append(timed_stream(engine, greedy(SHORT_PROMPT, N_GEN, cv_all)))
        s["decode_d0_steer1_gen"].append(timed_stream(engine, greedy(SHORT_PROMPT, N_GEN, cv_one, "generated")))
        raw("tg_d0", 0, N_GEN)
        # Steered cold prompt and steered decode at depth.
        s["cold_steer1"].append(timed_stream(engine, greedy(prompt, N_GEN, cv_one)))
        raw("tg_d512", 0, N_GEN, N_PROMPT)
        timed_stream(engine, greedy(SHORT_PROMPT, 1))  # clear steering
        s["steer_process"].append(steer_first_byte(*steer))


def morph_figures(sm: Samples) -> dict:
    col, s = sm.col, sm.s
    return {
        "ttft_cold_s": med(col("cold", "ttft_s")),
        "ttft_cold_steered_s": med(col("cold_steer1", "ttft_s")),
        "prompt_tokens": med(col("cold", "prompt_tokens")),
        "prompt_tok_s": med(col("cold", "prompt_tok_s")),
        "ttft_append_s": med(col("append", "ttft_s")),
        "append_evaluated_tokens": med(col("append", "evaluated_tokens")),
        "ttft_append_generated_s": med(col("append_gen", "ttft_s")),
        "append_generated_evaluated_tokens": med(col("append_gen", "evaluated_tokens")),
        "decode_tok_s": med(col("decode_d0", "decode_tok_s")),
        "decode_steered_1block_tok_s": med(col("decode_d0_steer1", "decode_tok_s")),
        "decode_steered_allblocks_tok_s": med(col("decode_d0_steerall", "decode_tok_s")),
        "decode_steered_generated_tok_s": med(col("decode_d0_steer1_gen", "decode_tok_s")),
        "ttft_steered_generated_s": med(col("decode_d0_steer1_gen", "ttft_s")),
        "ttft_steered_1block_s": med(col("decode_d0_steer1", "ttft_s")),
        "decode_at_depth_tok_s": med(col("cold", "decode_tok_s")),
        "decode_at_depth_steered_1block_tok_s": med(col("cold_steer1", "decode_tok_s")),
        "gen_tokens_min": min(x.get("gen_tokens") or 0 for k in s if k not in ("append", "append_gen", "steer_process")
                              for x in s[k]),
        "steer_first_byte_s": med(col("steer_process", "first_byte_s")),
        "steer_exit_s": med(col("steer_process", "exit_s")),
    }


def comparisons(sm: Samples, morph: dict) -> dict:
    """Raw medians, paired ratios (morph / raw within a repetition), ratios of medians."""
    col, exe = sm.col, sm.exe
    # Raw figure of a repetition: the mean of its runs (tg runs twice, around the morph runs).
    raw_rep = {k: [statistics.fmean(x) if x else None for x in v] for k, v in sm.raw_s.items()}
    raw_med = {f"pp{N_PROMPT}@d0": med(raw_rep["pp_d0"]), f"tg{N_GEN}@d0": med(raw_rep["tg_d0"]),
               f"tg{N_GEN}@d{N_PROMPT}": med(raw_rep["tg_d512"]),
               f"pp{APPEND_TOKENS}@d{N_PROMPT}": med(raw_rep["pp_append"])} if exe else {}
    raw_append_s = ratio(APPEND_TOKENS, raw_med.get(f"pp{APPEND_TOKENS}@d{N_PROMPT}"))

    def paired(name, key, raw_key):
        """Median over repetitions of morph / raw within the same repetition."""
        xs = [ratio(m, rw) for m, rw in zip(col(name, key), raw_rep.get(raw_key, []))]
        return med(xs), xs

    pairs = {
        "decode / raw tg": paired("decode_d0", "decode_tok_s", "tg_d0"),
        "steered decode (1 block) / raw tg": paired("decode_d0_steer1", "decode_tok_s", "tg_d0"),
        "steered decode (all blocks) / raw tg": paired("decode_d0_steerall", "decode_tok_s", "tg_d0"),
        "steered decode (generated only) / raw tg": paired("decode_d0_steer1_gen", "decode_tok_s", "tg_d0"),
        f"decode at depth {N_PROMPT} / raw tg at depth": paired("cold", "decode_tok_s", "tg_d512"),
        f"steered decode at depth {N_PROMPT} / raw tg at depth": paired("cold_steer1", "decode_tok_s", "tg_d512"),
        "prompt / raw pp": paired("cold", "prompt_tok_s", "pp_d0"),
    } if exe else {}
    steer_cost = [ratio(a, b) for a, b in zip(col("decode_d0_steer1", "decode_tok_s"), col("decode_d0", "decode_tok_s"))]
    ratios = {k: v[0] for k, v in pairs.items()}
    ratios["steered decode (1 block) / unsteered decode"] = med(steer_cost)
    if raw_append_s:
        # Time, not speed: > 1 means morph is slower than llama.cpp evaluating the same tokens.
        raw_med[f"append: {APPEND_TOKENS} tokens evaluated at depth {N_PROMPT}, s"] = round(raw_append_s, 5)
        ratios["TTFT after appending / raw eval of the appended tokens"] = ratio(morph["ttft_append_s"], raw_append_s)
        ratios["TTFT after appending, steered generated only / raw eval of the appended tokens"] = ratio(
            morph["ttft_append_generated_s"], raw_append_s)
    ratios_of_medians = {
        "decode / raw tg": ratio(morph["decode_tok_s"], raw_med.get(f"tg{N_GEN}@d0")),
        "steered decode (1 block) / raw tg": ratio(morph["decode_steered_1block_tok_s"], raw_med.get(f"tg{N_GEN}@d0")),
        "prompt / raw pp": ratio(morph["prompt_tok_s"], raw_med.get(f"pp{N_PROMPT}@d0")),
    }
    return {"raw_med": raw_med, "ratios": ratios, "ratios_of_medians": ratios_of_medians, "pairs": pairs,
            "steer_cost": steer_cost}


def best_of_reps(sm: Samples) -> dict:
    col, raw_s = sm.col, sm.raw_s
    bests = {
        "ttft_cold_s": best(col("cold", "ttft_s"), lowest=True),
        "ttft_append_s": best(col("append", "ttft_s"), lowest=True),
        "prompt_tok_s": best(col("cold", "prompt_tok_s")),
        "decode_tok_s": best(col("decode_d0", "decode_tok_s")),
        "decode_steered_1block_tok_s": best(col("decode_d0_steer1", "decode_tok_s")),
        "decode_steered_allblocks_tok_s": best(col("decode_d0_steerall", "decode_tok_s")),
        "decode_at_depth_tok_s": best(col("cold", "decode_tok_s")),
        "steer_first_byte_s": best(col("steer_process", "first_byte_s"), lowest=True),
        f"raw pp{N_PROMPT}@d0": best([x for v in raw_s["pp_d0"] for x in v]),
        f"raw tg{N_GEN}@d0": best([x for v in raw_s["tg_d0"] for x in v]),
        f"raw tg{N_GEN}@d{N_PROMPT}": best([x for v in raw_s["tg_d512"] for x in v]),
    }
    bests["ratios"] = {
        "decode / raw tg": ratio(bests["decode_tok_s"], bests[f"raw tg{N_GEN}@d0"]),
        "steered decode (1 block) / raw tg": ratio(bests["decode_steered_1block_tok_s"], bests[f"raw tg{N_GEN}@d0"]),
        "steered decode (all blocks) / raw tg": ratio(bests["decode_steered_allblocks_tok_s"], bests[f"raw tg{N_GEN}@d0"]),
        f"decode at depth {N_PROMPT} / raw tg at depth": ratio(bests["decode_at_depth_tok_s"], bests[f"raw tg{N_GEN}@d{N_PROMPT}"]),
        "prompt / raw pp": ratio(bests["prompt_tok_s"], bests[f"raw pp{N_PROMPT}@d0"]),
    }
    return bests


def noise_of(sm: Samples) -> dict:
    """Spread of the raw decode runs (quiet machine: within ~10%), loads, timeouts."""
    tg_all = [x for v in sm.raw_s["tg_d0"] for x in v]
    noisy = bool(sm.raw_timeouts) or (bool(tg_all) and max(tg_all) / min(tg_all) > 1.25)
    if noisy:
        log("warning: raw decode speed varied by more than 25% in this run (busy machine): rerun when quieter")
    return {"raw tg128 max/min": ratio(max(tg_all), min(tg_all)) if tg_all else None,
            "load_avg_1min_per_rep": sm.loads, "cpu_busy_before_rep": sm.busy or None,
            "raw_timeouts": sm.raw_timeouts, "noisy": noisy}


def targets_of(morph: dict, ratios: dict, steer_desc: str) -> list[dict]:
    def target(name, value, op, limit, note=""):
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        return {"target": name, "measured": value, "limit": f"{op} {limit}", "pass": ok, **({"note": note} if note else {})}

    return [
        target("steered decode >= 0.92 x raw tg (aim 0.97)", ratios.get("steered decode (1 block) / raw tg"), ">=", 0.92,
               "one middle block; paired per repetition; all blocks: %s" % ratios.get("steered decode (all blocks) / raw tg")),
        target("TTFT after appending <= 60 ms", morph["ttft_append_s"], "<=", 0.060),
        target("TTFT after appending, steered on generated tokens only <= 60 ms", morph["ttft_append_generated_s"],
               "<=", 0.060, "apply=generated: the vector is cleared for the prompt and set again per request"),
        target("`morph steer` start to first byte <= 1.0 s", morph["steer_first_byte_s"], "<=", 1.0, steer_desc),
    ]


def main() -> int:
    args = parse_args()
    reps = args.reps or (2 if args.quick else 5)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    info = models.check(models.resolve(args.model))
    threads = args.threads or default_threads()
    exe = None
    if not args.no_raw:
        exe = _llama_bench.ensure()
        log(f"llama-bench: {exe}")

    import llama_cpp

    log(f"loading {info.file.path.name} ({threads} threads)")
    # adaptive threads off: the raw llama-bench runs right before each figure would count as
    # other work and cost threads (bench/contention.py measures that behaviour)
    engine = LlamaEngine(info, n_ctx=4096, threads=threads, flash_attn=True, adaptive_threads=False)
    block = min(STEER_BLOCK, info.n_layer // 2)
    cv_one = random_vector(engine, [block])
    cv_all = random_vector(engine, list(range(1, info.n_layer)))
    # Warm-up (llama-bench warms up too): page in weights, build graphs.
    timed_stream(engine, greedy(SHORT_PROMPT, 16))

    tmp = Path(tempfile.mkdtemp(prefix="morph-bench-"))
    argv, steer_desc = steer_argv(info, tmp, cv_one)
    env = dict(os.environ, MORPH_DATA_DIR=str(tmp / "data"))
    # A private data dir whose config uses the same thread count as everything else here.
    (tmp / "data").mkdir()
    (tmp / "data" / "config.toml").write_text(f"threads = {threads}\n")
    steer_first_byte(argv, env)  # first run creates the data dir and warms the page cache

    sm = Samples(exe, info, threads)
    for r in range(reps):
        log(f"repetition {r + 1}/{reps}")
        sm.rep = r
        if args.wait_idle > 0:
            sm.busy.append(wait_idle(args.wait_idle))
        sm.loads.append(round(os.getloadavg()[0], 2))
        sm.repetition(engine, cv_one, cv_all, (argv, env))
    engine.close()
    shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    morph = morph_figures(sm)
    cmp = comparisons(sm, morph)
    wheel_info = llama_cpp.llama_print_system_info().decode().strip()
    raw_info = _llama_bench.system_info(exe) if exe else None
    if morph["gen_tokens_min"] < N_GEN:
        log(f"warning: a run stopped after {morph['gen_tokens_min']} tokens (EOS), decode figures cover fewer tokens")
    report = {
        "bench": "engine",
        "config": {"model": str(info.file.path), "threads": threads, "flash_attn": True, "n_ctx": 4096,
                   "reps": reps, "n_prompt": N_PROMPT, "n_gen": N_GEN, "steer_block": block,
                   "steer_fraction_of_residual_norm": STEER_FRACTION, "steer_command": " ".join(argv[1:])},
        "machine": {**machine(), "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in load_after],
                    "wall_s": round(time.perf_counter() - t_start, 1)},
        "versions": {"llama-cpp-python": md.version("llama-cpp-python"),
                     "system_info": wheel_info,
                     "llama-bench system_info": raw_info,
                     "same CPU features": (raw_info == wheel_info) if raw_info else None,
                     "llama-bench build": ({k: sm.raw_rows[0].get(k) for k in ("build_commit", "build_number", "backends", "cpu_info")}
                                           if sm.raw_rows else None)},
        "morph": morph,
        "raw_llama_bench_tok_s": cmp["raw_med"],
        "ratios": cmp["ratios"],
        "ratios_of_medians": cmp["ratios_of_medians"],
        "best_of_reps": best_of_reps(sm),
        "noise": noise_of(sm),
        "targets": targets_of(morph, cmp["ratios"], steer_desc),
        "samples": {"morph": sm.s,
                    "raw": [{k: x.get(k) for k in ("rep", "n_prompt", "n_gen", "n_depth", "avg_ts")} for x in sm.raw_rows],
                    "paired_ratios": {k: v[1] for k, v in cmp["pairs"].items()},
                    "steered / unsteered": cmp["steer_cost"]},
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, subprocess.CalledProcessError, MorphError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(1)
