"""`morph doctor`: what a user runs when something is wrong.

Every check gives a status (ok, fail, or info) and one line. Anything that runs llama.cpp
code (importing it, loading the model, generating) runs in a child process, `morph doctor
--child`, which prints one JSON line per stage: a native crash there (a SIGSEGV in
llama.cpp, a SIGILL from a library built for another CPU) becomes a line in the report,
with the stage it reached and its crash report, instead of killing doctor.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from morph import crash, models, paths
from morph.errors import MorphError

OK, FAIL, INFO = "ok", "FAIL", "info"
PROMPT = "The lighthouse keeper climbed the stairs every evening, and"
GEN_TOKENS = 32
STAGES = {None: "importing llama.cpp", "llama.cpp": "loading the model", "load": "generating",
          "generate": "closing"}  # the child's last stage done -> what it was doing next
ORDER = ("cpu", "llama.cpp", "extra buffer types", "threads", "model", "data dir", "crashes", "generation")
SIMD_PREFIXES = ("sse", "ssse", "pni", "avx", "fma", "f16c", "bmi", "amx", "asimd", "sve", "i8mm")


@dataclass
class Check:
    name: str
    status: str  # OK | FAIL | INFO
    summary: str
    details: dict = field(default_factory=dict)


def run(model: str | None, threads: int | None, timeout: float) -> list[Check]:
    from morph.config import load_config

    cfg = load_config(create=False)
    checks = [cpu_check(), data_dir_check(), *crash_check()]
    model_ok, mf = model_check(model or cfg.model, checks)
    checks.extend(child_checks(model, threads, timeout, mf if model_ok else None))
    return sorted(checks, key=lambda c: ORDER.index(c.name))


def cpu_check() -> Check:
    from morph.engine.llamacpp import cpu_flags, has_amx

    flags = cpu_flags()
    simd = sorted("sse3" if f == "pni" else f for f in flags if f.startswith(SIMD_PREFIXES))
    amx = has_amx(flags)
    return Check("cpu", INFO, f"{cpu_name()}; SIMD: {' '.join(simd) or 'none reported'}; AMX: {'yes' if amx else 'no'}",
                 {"name": cpu_name(), "simd": simd, "amx": amx, "cores": _cores()})


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cores() -> int:
    from morph.engine.llamacpp import default_threads

    return default_threads()


def crash_check() -> list[Check]:
    found = crash.reports(crash.crash_dir(paths.data_dir()))
    if not found:
        return [Check("crashes", INFO, "no crash reports")]
    recent = found[-5:]
    lines = [f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.when))} {r.error} in `{r.command}`: {r.path}"
             for r in reversed(recent)]
    return [Check("crashes", INFO, f"{len(found)} crash report(s), newest first:\n" + "\n".join(lines),
                  {"reports": [{"path": str(r.path), "when": r.when, "error": r.error, "command": r.command}
                               for r in reversed(recent)]})]


def data_dir_check() -> Check:
    d = paths.data_dir()
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-"):
            pass
    except OSError as e:
        return Check("data dir", FAIL, f"{d}: not writable ({e.strerror or e}); give a writable --data-dir",
                     {"path": str(d), "writable": False})
    free = shutil.disk_usage(d).free
    return Check("data dir", OK, f"{d}: writable, {free / 1e9:.1f} GB free",
                 {"path": str(d), "writable": True, "free_bytes": free})


def model_check(spec: str | None, checks: list[Check]) -> tuple[bool, models.ModelFile | None]:
    try:
        mf = models.resolve(spec)
        models.check(mf)
    except MorphError as e:
        checks.append(Check("model", FAIL, str(e)))
        return False, None
    if not mf.path.is_file():  # packaged parts not joined yet: the child's load joins them
        checks.append(Check("model", OK, f"{mf.name}: {len(mf.parts)} packaged parts, joined on first use"))
        return True, mf
    digest = sha256(mf.path)
    size = mf.path.stat().st_size
    details = {"name": mf.name, "path": str(mf.path), "size": size, "sha256": digest}
    b64 = base64.urlsafe_b64encode(bytes.fromhex(digest)).rstrip(b"=").decode()
    if mf.expected_sha256 or mf.parts_sha256:
        good = b64 == mf.expected_sha256 if mf.expected_sha256 else digest == mf.parts_sha256
        details["sha256_ok"] = good
        if not good:
            fix = f"reinstall it: `{models.REINSTALL_DEFAULT}`" if mf.source == "embedded" else "delete it to join the parts again"
            checks.append(Check("model", FAIL, f"{mf.path}: sha256 {digest[:16]}... does not match the package's; {fix}",
                                details))
            return False, mf
        verdict = "sha256 matches the package's"
    else:
        verdict = f"sha256 {digest[:16]}... (no reference checksum for your own file)"
    checks.append(Check("model", OK, f"{mf.name}: {mf.path} ({size / 1e6:.1f} MB), {verdict}", details))
    return True, mf


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the child: llama.cpp in a process of its own -------------------------------------------


def child_command(model: str | None) -> list[str]:
    from morph import _bundle

    exe = [sys.executable] if _bundle.frozen() else [sys.executable, "-m", "morph"]
    return [*exe, *(["--model", model] if model else []), "doctor", "--child"]


def child_checks(model: str | None, threads: int | None, timeout: float, mf) -> list[Check]:
    from morph.engine.llamacpp import extra_buffer_decision

    extra, why = extra_buffer_decision()
    out = [Check("extra buffer types", INFO, f"{'on' if extra else 'off'} ({why})", {"on": extra, "why": why})]
    if mf is None:
        return [*out, Check("generation", FAIL, "skipped: no usable model")]
    run = _run_child(child_command(model) + (["--threads", str(threads)] if threads else []), timeout)
    return [*out, *_llama_checks(run.stages), _generation_check(run, timeout, extra)]


@dataclass
class ChildRun:
    pid: int
    returncode: int
    stages: dict[str, dict]  # stage -> its JSON line
    stderr: str
    timed_out: bool
    wall_s: float


def _run_child(cmd: list[str], timeout: float) -> ChildRun:
    env = dict(os.environ, MORPH_DATA_DIR=str(paths.data_dir()))
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    timed_out = False
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # SIGABRT first: faulthandler writes where it hung
        timed_out = True
        p.send_signal(signal.SIGABRT)
        try:
            stdout, stderr = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
    stages: dict[str, dict] = {}
    for line in stdout.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            stages[row.pop("stage")] = row
        except (ValueError, KeyError, AttributeError):
            continue
    return ChildRun(p.pid, p.returncode, stages, stderr.decode("utf-8", "replace"), timed_out,
                    round(time.monotonic() - t0, 2))


def _generation_check(run: ChildRun, timeout: float, extra: bool) -> Check:
    from morph.engine.llamacpp import has_amx

    during = STAGES[list(run.stages)[-1] if run.stages else None]
    # The child's own crash report (cli.main keeps one): claimed here, so no later run announces it.
    reports = crash.collect(crash.crash_dir(paths.data_dir()), pid=run.pid)
    report = str(reports[0].path) if reports else None
    where = f"; report: {report}" if report else ""
    if run.timed_out:
        return Check("generation", FAIL, f"generation timed out after {timeout:.0f} s in a child process, while "
                     f"{during}{where}; a busy CPU slows llama.cpp's threads a lot: try again, or with --threads 1",
                     {"timeout_s": timeout, "during": during, "report": report})
    if run.returncode < 0:
        sig = -run.returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown signal"
        hint = ("this CPU has AMX and extra buffer types were on: set extra_buffer_types = false in config.toml"
                if extra and has_amx() else "every morph command that generates will crash the same way")
        return Check("generation", FAIL, f"generation crashed with signal {sig} ({name}) in a child process, "
                     f"while {during}{where}; {hint}", {"signal": sig, "during": during, "report": report})
    gen = run.stages.get("generate")
    if run.returncode != 0 or gen is None:
        err = run.stderr.strip().splitlines()
        return Check("generation", FAIL, f"the child process failed (exit {run.returncode}) while {during}: "
                     + (err[-1] if err else "no message"), {"exit": run.returncode, "during": during})
    return Check("generation", OK, f"{gen['tokens']} tokens in a child process: decode {gen['tok_s']:.1f} tok/s, "
                 f"TTFT {gen['ttft_s']:.3f} s, {_threads(gen['threads'])}: {gen['text'][:60]!r}", {**gen, "wall_s": run.wall_s})


def _llama_checks(stages: dict[str, dict]) -> list[Check]:
    lib, load = stages.get("llama.cpp"), stages.get("load")
    if lib is None:
        return [Check("llama.cpp", FAIL, "llama_cpp could not be imported in the child process")]
    out = [Check("llama.cpp", OK, f"llama-cpp-python {lib['version']}; CPU backend: {lib['backend']}; "
                 f"{lib['system_info']}", lib)]
    if load is not None:
        adaptive = ("adaptive: fewer while other work keeps the CPUs busy" if load["adaptive"]
                    else "fixed (adaptive_threads = false, or 1 thread)")
        out.append(Check("threads", INFO, f"{_threads(load['threads'])}, {adaptive}; OpenMP waiting: {lib['omp_wait']}",
                         {"threads": load["threads"], "adaptive": load["adaptive"], "omp_wait": lib["omp_wait"]}))
    return out


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def child(model: str | None, threads: int | None) -> None:
    """Runs in the child process: import llama.cpp, load the model, generate; a JSON line
    after each stage, so the parent knows how far a crash came."""
    from morph.engine import llamacpp
    from morph.engine.base import Request
    from morph.config import load_config

    def emit(stage: str, **kw) -> None:
        print(json.dumps({"stage": stage, **kw}), flush=True)

    import llama_cpp

    llamacpp.load_cpu_backends(llama_cpp)  # what open_llama does first; then the build can say what it runs
    emit("llama.cpp", version=llama_cpp.__version__, backend=llamacpp.cpu_backend(),
         system_info=llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
         omp_wait=llamacpp.omp_waiting())
    from morph.engine.llama import LlamaEngine
    from morph.runtime import model_info

    cfg = load_config(create=False)
    t0 = time.perf_counter()
    eng = LlamaEngine(model_info(model or cfg.model), n_ctx=512, threads=threads or cfg.threads)
    emit("load", load_s=round(time.perf_counter() - t0, 3), threads=eng.threads, adaptive=eng.adaptive,
         extra_bufts=bool(eng.llm.model_params.use_extra_bufts))
    done = None
    text = []
    for ev in eng.stream(Request(prompt=PROMPT, max_tokens=GEN_TOKENS, temperature=0.0)):
        text.append(ev.text)
        if ev.done:
            done = ev.timings
    eng.close()
    emit("generate", tokens=done.gen_tokens, tok_s=round(done.tok_per_s, 2), ttft_s=round(done.ttft_s, 4),
         threads=eng.threads, text="".join(text))


def as_json(checks: list[Check]) -> str:
    return json.dumps({"ok": ok(checks), "checks": [asdict(c) for c in checks]}, indent=2)


def ok(checks: list[Check]) -> bool:
    return not any(c.status == FAIL for c in checks)


def as_text(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    pad = "\n" + " " * (width + 8)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.summary.replace(chr(10), pad)}" for c in checks]
    failed = [c.name for c in checks if c.status == FAIL]
    lines.append("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return "\n".join(lines)
