"""Opening llama.cpp models: the one place where morph loads a model file into llama.cpp.

Every llama.cpp load in morph (the engine, and through its model the capture and batch
contexts, `vectors build`, `morph eval`, the single executable, the bench scripts) comes
through `open_llama`, so what must hold for every load is decided here:

- **Extra buffer types** (`llama_model_params.use_extra_bufts`: weights repacked for a
  faster kernel, and on CPUs with AMX llama.cpp's AMX buffer). The AMX one segfaults on
  the first decode on virtualised Sapphire Rapids CPUs (ggml-org/llama.cpp#20824, open),
  so they are off where the CPU reports AMX and on elsewhere; `extra_buffer_types` in
  config.toml forces either. `Llama(use_extra_bufts=...)` is swallowed by its **kwargs:
  the field must be set on the model params Llama builds, hence `_model_params`.
- **CPU backend variants**: a portable build (dist/morph) keeps one libggml-cpu per
  instruction set, which must be loaded before the first model (`load_cpu_backends`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import lru_cache
from pathlib import Path

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
    if setting is None:
        from morph.config import load_config

        setting = load_config(create=False).extra_buffer_types
    if setting is None:
        return not has_amx()
    return bool(setting)


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
    with _model_params(llama_cpp, extra_buffer_types(extra_bufts)):
        if n_seq_max == 1:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        with _context_params(llama_cpp, n_seq_max):
            return llama_cpp.Llama(model_path=str(path), **kwargs)


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
