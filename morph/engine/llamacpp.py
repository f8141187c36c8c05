"""Opening llama.cpp models: the one place where morph loads a model file into llama.cpp.

Every llama.cpp load in morph (the engine, and through its model the capture and batch
contexts, `vectors build`, `morph eval`, the single executable, the bench scripts) comes
through `open_llama`, so what must hold for every load is decided here:

- **Extra buffer types** (`llama_model_params.use_extra_bufts`: weights repacked for a
  faster kernel, and on CPUs with AMX llama.cpp's AMX buffer). The AMX one segfaults on
  the first decode on virtualised Sapphire Rapids CPUs (ggml-org/llama.cpp#20824, open),
  so they are off where the CPU reports AMX and on elsewhere; `extra_buffer_types` in
  config.toml forces either. `Llama(use_extra_bufts=...)` is swallowed by its **kwargs:
  the field must be set on the model params Llama builds, hence `_model_params`. With it
  off no AMX code runs, in the pip build or the portable build's sapphirerapids variant:
  llama.cpp offers the CPU's extra buffer types to a model only when it is on
  (src/llama-model.cpp, make_cpu_buft_list), and ggml runs its AMX matmul only on weights
  in the AMX buffer (ggml-cpu/amx/amx.cpp, extra_buffer_type::supports_op and
  get_tensor_traits; ggml-cpu/traits.cpp, ggml_cpu_extra_compute_forward).
- **CPU backend variants**: a portable build (dist/morph) keeps one libggml-cpu per
  instruction set, which must be loaded before the first model (`load_cpu_backends`).
- **Threads on a shared CPU**: llama.cpp's threads meet at an OpenMP barrier after every
  op and spin there, so a thread that is off the CPU stalls the others: two processes
  generating at once on 2 cores fell from ~105 to ~20 tok/s each (bench/contention.py).
  `ThreadGovernor` gives the next decode only the CPUs other work leaves free; alone it
  keeps every thread. A passive OpenMP wait policy cost 70% of the speed alone instead.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from functools import lru_cache
from pathlib import Path

from morph import crash
from morph.errors import MorphError

AMX_FLAGS = ("amx_int8", "amx_tile", "amx_bf16")
_params_lock = threading.Lock()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, arm
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def has_amx(flags: frozenset[str] | None = None) -> bool:
    return any(f in (cpu_flags() if flags is None else flags) for f in AMX_FLAGS)


def extra_buffer_types(setting: bool | None = None) -> bool:
    """Whether llama.cpp may use extra buffer types: `setting` if given, else config.toml's
    `extra_buffer_types`, else off on CPUs with AMX and on elsewhere."""
    return extra_buffer_decision(setting)[0]


def extra_buffer_decision(setting: bool | None = None) -> tuple[bool, str]:
    """extra_buffer_types' answer and why (what `morph doctor` prints)."""
    if setting is not None:
        return bool(setting), "asked for by the caller"
    from morph.config import load_config

    setting = load_config(create=False).extra_buffer_types
    if setting is not None:
        return setting, f"extra_buffer_types = {str(setting).lower()} in config.toml"
    if has_amx():
        return False, "default: this CPU reports AMX, whose buffer type crashes llama.cpp (llama.cpp#20824)"
    return True, "default: no AMX on this CPU"


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _model_params:
    """Within the block, Llama(...) builds its model params with `use_extra_bufts` set:
    Llama.__init__ takes them from llama_cpp.llama_model_default_params() and has no
    argument for the field. Locked, since the patch is process-wide."""

    def __init__(self, llama_cpp, extra: bool):
        self.mod = llama_cpp.llama_cpp
        self.extra = extra

    def __enter__(self):
        _params_lock.acquire()
        self.orig = orig = self.mod.llama_model_default_params
        extra = self.extra

        def params():
            p = orig()
            p.use_extra_bufts = extra
            return p

        self.mod.llama_model_default_params = params

    def __exit__(self, *exc):
        self.mod.llama_model_default_params = self.orig
        _params_lock.release()


class _context_params:
    """Within the block, Llama(...) builds its context with `n_seq_max` sequences in one
    unified KV cache (Llama has no argument for either field). Under _model_params' lock."""

    def __init__(self, llama_cpp, n_seq_max: int):
        self.mod = llama_cpp.llama_cpp
        self.n_seq_max = n_seq_max

    def __enter__(self):
        self.orig = orig = self.mod.llama_context_default_params
        n = self.n_seq_max

        def params():
            p = orig()
            p.n_seq_max = n
            p.kv_unified = True  # every sequence may use all n_ctx cells
            return p

        self.mod.llama_context_default_params = params

    def __exit__(self, *exc):
        self.mod.llama_context_default_params = self.orig


def open_llama(path: str | os.PathLike, *, extra_bufts: bool | None = None, n_seq_max: int = 1, **kwargs):
    """llama_cpp.Llama on `path` (kwargs as Llama's), with the backends loaded and the
    extra-buffer-type decision applied. `llm.model_params.use_extra_bufts` says what it got.
    `n_seq_max` > 1: a context whose one KV cache holds that many sequences."""
    import llama_cpp

    load_cpu_backends(llama_cpp)
    kwargs.setdefault("verbose", False)
    extra = extra_buffer_types(extra_bufts)
    crash.note(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, model {path}, "
               f"extra buffer types {'on' if extra else 'off'}, {kwargs.get('n_threads')} threads")
    with _model_params(llama_cpp, extra):
        if n_seq_max == 1:
            llm = llama_cpp.Llama(model_path=str(path), **kwargs)
        else:
            with _context_params(llama_cpp, n_seq_max):
                llm = llama_cpp.Llama(model_path=str(path), **kwargs)
    _test_fault()
    return llm


def _test_fault() -> None:
    """Tests of crash reports and `morph doctor`: MORPH_TEST_CRASH=segv crashes the process
    in native code right after a model loads (where the AMX crash happened), =hang stalls it."""
    fault = os.environ.get("MORPH_TEST_CRASH")
    if fault == "segv":
        import faulthandler

        faulthandler._sigsegv()
    elif fault == "hang":
        threading.Event().wait()


def load_cpu_backends(llama_cpp, directory: str | os.PathLike | None = None) -> None:
    """Builds with GGML_BACKEND_DL (the portable one in dist/morph) keep the CPU code in
    several libggml-cpu-<variant>.so, one per instruction set; ggml scores them against
    this CPU and loads the best. Its default search path is the executable's directory
    and the cwd, neither of which holds them here, so name the directory. Builds without
    it (the default pip build) have the CPU backend linked in: nothing to do."""
    lib = Path(llama_cpp.__file__).resolve().parent / "lib"
    if directory is None:
        from morph import _bundle

        directory = _bundle.backends_dir()
        if directory is None:  # pip puts them in site-packages/bin (llama.cpp's own install rule)
            found = [d for d in (lib, lib.parent.parent / "bin") if any(d.glob("libggml-cpu-*.so"))]
            if not found:
                return
            directory = found[0]
    # The registry libllama uses: its libggml.so.0, already loaded, found by soname (the
    # wheel holds libggml.so* as separate copies; opening another by path is another registry).
    try:
        ggml = ctypes.CDLL("libggml.so.0")
    except OSError:
        ggml = ctypes.CDLL(str(lib / "libggml.so"))
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_reg_count() == 0:
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        with quiet_stderr():  # ggml logs "load_backend: loaded CPU backend from ..." at info level
            ggml.ggml_backend_load_all_from_path(os.fsencode(directory))
    if ggml.ggml_backend_reg_count() == 0:
        raise MorphError(f"no llama.cpp CPU backend in {directory} fits this CPU")


def adaptive_threads(setting: bool | None = None) -> bool:
    """Whether the engine's threads give way to other work: `setting` if given, else
    config.toml's `adaptive_threads` (default on)."""
    if setting is not None:
        return setting
    from morph.config import load_config

    return load_config(create=False).adaptive_threads


class ThreadGovernor:
    """How many threads the next decode should use, given how busy other processes keep the
    CPUs this process may run on: llama.cpp's threads meet at a barrier after every op, so
    one thread that is off the CPU stalls the others. Every INTERVAL seconds it compares the
    busy time of those CPUs (/proc/stat) with this process's own (os.times): the rest is
    other work, and the threads are the CPUs it leaves free (at least 1, at most `most`)."""

    INTERVAL = 0.2
    STALE = 1.0  # a longer window (the engine sat idle) says what others did then, not now

    def __init__(self, most: int):
        self.most = most
        try:
            self.cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        except AttributeError:
            self.cpus = set()
        self.now = most
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                busy = 0
                for line in fh:
                    if not line.startswith("cpu"):
                        break
                    f = line.split()
                    if f[0] in self.cpus:  # user nice system idle iowait irq softirq steal
                        busy += sum(int(x) for x in f[1:9]) - int(f[4]) - int(f[5])
        except (OSError, ValueError, IndexError):
            return None
        t = os.times()
        return time.monotonic(), busy / self.tick, t.user + t.system

    def threads(self) -> int:
        if self.last is None or self.most <= 1 or time.monotonic() - self.last[0] < self.INTERVAL:
            return self.now
        new = self._sample()
        if new is None:
            return self.now
        (t0, busy0, own0), (t1, busy1, own1) = self.last, new
        self.last = new
        if t1 - t0 > self.STALE:  # e.g. a build that ended while we waited: start with all, look again soon
            self.now = self.most
            return self.now
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)  # CPUs' worth of other work
        self.now = max(1, min(self.most, int(len(self.cpus) - others + 0.5)))
        return self.now


def cpu_backend() -> str:
    """The CPU backend library this process runs llama.cpp with (after a model is loaded)."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    libs = sorted({line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/libggml-cpu" in line})
    variants = [lib for lib in libs if lib.startswith("libggml-cpu-")]
    if variants:
        names = ", ".join(v[len("libggml-cpu-"):].split(".so")[0] for v in variants)
        return f"{names} (the portable build's variant ggml chose for this CPU: {', '.join(variants)})"
    if libs:
        return f"{libs[0]}, linked in (built for the CPU it was compiled on)"
    return "unknown (no libggml-cpu in this process)"


def omp_waiting() -> str:
    """How llama.cpp's OpenMP threads wait in this process (libgomp's settings), for `morph doctor`."""
    now = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    return now or "libgomp's default"


class quiet_stderr:
    """fd 2 to /dev/null for a C call that prints (Python's sys.stderr is left alone)."""

    def __enter__(self):
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
