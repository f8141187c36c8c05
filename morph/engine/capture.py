"""Residual-stream capture (and position edits) through llama.cpp's eval callback.

A separate llama context shares the generation context's weights but has the eval
callback set: the callback costs the GIL on every graph node, so it must stay off the
context that generates. The context never has a control vector, so `l_out-L` is clean.

FACTS: the callback is asked once per node (~1,086 per eval); we observe only `l_out-L`.
Returning False after it stops the graph, which makes capture ~2x faster; logits and
deeper KV are garbage then, so each text is evaluated in one ubatch from an empty cache.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from morph.errors import MorphError

GGML_TYPE_F32 = 0


def _libggml_base():
    import llama_cpp

    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        p = libdir / name
        if p.exists():
            lib = ctypes.CDLL(str(p))
            break
    else:
        raise MorphError(f"cannot find libggml-base in {libdir}")
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    for fn in (lib.ggml_backend_tensor_get, lib.ggml_backend_tensor_set):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def tensor_rows(ggml, t, n_embd: int, edit: Callable[[np.ndarray], np.ndarray | None] | None = None) -> np.ndarray:
    """Read a host F32 activation tensor as (n_tokens, n_embd); if `edit` returns an array,
    write it back into the graph (everything downstream sees it) and return that."""
    n = ggml.ggml_nelements(t)
    nbytes = ggml.ggml_nbytes(t)
    if nbytes != n * 4 or ctypes.c_int32.from_address(t).value != GGML_TYPE_F32:
        raise MorphError(f"{ggml.ggml_get_name(t)!r} is not a contiguous F32 tensor")
    arr = np.empty((n // n_embd, n_embd), dtype=np.float32)
    ggml.ggml_backend_tensor_get(t, arr.ctypes.data, 0, nbytes)
    if edit is None:
        return arr
    new = edit(arr)
    if new is None:
        return arr
    new = np.ascontiguousarray(new, dtype=np.float32)
    if new.shape != arr.shape:
        raise MorphError("edit changed the activation shape")
    ggml.ggml_backend_tensor_set(t, new.ctypes.data, 0, nbytes)
    return new


class Capturer:
    """Capture context bound to a LlamaEngine's model. Not thread-safe; one call at a time."""

    def __init__(self, engine, n_ctx: int = 1024):
        import llama_cpp
        from llama_cpp import _internals as internals

        self._lc = llama_cpp
        self.engine = engine
        self.n_embd = engine.n_embd
        self.n_ctx = n_ctx
        self._ggml = _libggml_base()
        self._lock = threading.Lock()
        # Per-call state read by the callback.
        self._target = b""
        self._stop_after = False
        self._edit: Callable[[np.ndarray], np.ndarray | None] | None = None
        self._chunks: list[np.ndarray] = []
        self._error: BaseException | None = None
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._callback)  # keep alive

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx  # one ubatch per text: an early stop never splits a text
        params.n_threads = engine.threads
        params.n_threads_batch = engine.threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.cb_eval = self._cb
        params.cb_eval_user_data = None
        self._ctx = internals.LlamaContext(model=engine.llm._model, params=params, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()

    def _callback(self, t, ask, _ud) -> bool:
        try:
            name = self._ggml.ggml_get_name(t)
            if ask:
                return name == self._target
            if name != self._target:
                return True
            arr = tensor_rows(self._ggml, t, self.n_embd, self._edit)
            if self._edit is None:
                self._chunks.append(arr)
            return not self._stop_after
        except BaseException as e:  # an exception here would silently stop the graph
            self._error = e
            return False

    def _run(self, tokens: list[int], layer: int, stop_after: bool, edit=None) -> int:
        if not 0 <= layer < self.engine.n_layer:
            raise MorphError(f"layer {layer} is outside 0..{self.engine.n_layer - 1}")
        if len(tokens) > self.n_ctx:
            tokens = tokens[: self.n_ctx]
        self._target = f"l_out-{layer}".encode()
        self._stop_after = stop_after
        self._edit = edit
        self._chunks = []
        self._error = None
        self._ctx.kv_cache_clear()
        self._batch.set_batch(tokens, n_past=0, logits_all=False)
        rc = self._lc.llama_decode(self._ctx.ctx, self._batch.batch)
        if self._error is not None:
            raise self._error
        if rc not in (0, 2) or (rc == 2 and not stop_after):
            raise MorphError(f"llama_decode failed during capture (code {rc})")
        return len(tokens)

    def capture(
        self,
        texts: Sequence[str],
        layer: int,
        add_bos: bool = True,
        drop_first: bool = True,
    ) -> list[np.ndarray]:
        """Per text, an array (n_tokens, n_embd) of `l_out-<layer>`.

        Position 0 is dropped by default: whether it is BOS or (SmolLM2 adds none) the first
        word, it is the attention sink with a residual norm ~160x the median.
        """
        out = []
        with self._lock:
            for text in texts:
                tokens = self.engine.tokenize(text, add_bos=add_bos)
                if not tokens:
                    out.append(np.zeros((0, self.n_embd), np.float32))
                    continue
                self._run(tokens, layer, stop_after=True)
                acts = np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.n_embd), np.float32)
                if drop_first:
                    acts = acts[1:]
                out.append(acts)
        return out

    def capture_tokens(self, tokens: list[int], layer: int) -> np.ndarray:
        """Activations for exact token ids (no BOS handling)."""
        with self._lock:
            self._run(tokens, layer, stop_after=True)
            return np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.n_embd), np.float32)

    def logits_with_edit(
        self, text: str, layer: int, edit: Callable[[np.ndarray], np.ndarray | None]
    ) -> np.ndarray:
        """Next-token logits after `text`, with `edit(acts)` rewriting `l_out-<layer>`.

        `edit` gets (n_tokens, n_embd) and returns the replacement (or None to keep it).
        This is the position-specific intervention self-explanation needs.
        """
        with self._lock:
            tokens = self.engine.tokenize(text)
            self._run(tokens, layer, stop_after=False, edit=edit)
            ptr = self._ctx.get_logits_ith(-1)
            return np.ctypeslib.as_array(ptr, shape=(self.engine.llm.n_vocab(),)).copy()
