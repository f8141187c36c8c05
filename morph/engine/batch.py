"""Many sequences in one llama.cpp context: batched decode with residual capture and edits.

Single-sequence decode on 2 CPU cores is ~130 tok/s and bound by per-call overhead;
putting 32-64 sequences in one `llama_batch` turns the step into a real matrix product
and the aggregate rate approaches prompt-processing speed. This context also carries the
eval callback, so `l_out-L` of every token in a batch is captured during generation
(the capture pass is then free) and can be rewritten per row (per-sequence steering,
self-explanation edits). It is a context of its own: the callback costs the GIL per graph
node and must stay off the engine's generation context (FACTS).

KV layout: with `unified=True` all sequences share one cache and llama.cpp splits a batch
in order (`split_simple`), so any mix of prompts and decode tokens works and row i of the
captured tensor is token i of the batch; but every token then attends over the whole used
range of the cache (~20% slower at 300 tokens per sequence, measured). With
`unified=False` each sequence has its own stream and llama.cpp splits with `split_equal`,
which keeps batch order only for one sequence per call or one token per sequence with
consecutive ids: engine/generate.py keeps to those two shapes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from morph.engine.base import EditFn
from morph.engine.ggml import libggml, tensor_rows
from morph.errors import MorphError


class BatchRunner:
    """A multi-sequence context on a LlamaEngine's model. Not thread-safe.

    Made by `LlamaEngine.batch_runner(...)`; the protocol is `morph.engine.base.BatchRunner`.
    """

    def __init__(self, engine, n_seq: int = 32, n_ctx: int = 8192, n_batch: int = 512,
                 unified: bool = True):
        import llama_cpp
        from llama_cpp import _internals as internals

        self._lc = llama_cpp
        self.engine = engine
        self.n_embd = engine.n_embd
        self.n_layer = engine.n_layer
        self.n_vocab = engine.n_vocab
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.unified = unified
        self._ggml = libggml()
        self._targets: dict[bytes, int] = {}
        self._captured: dict[int, list[np.ndarray]] = {}
        self._edit: EditFn | None = None
        self._stop_at: bytes | None = None
        self._error: BaseException | None = None
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._callback)  # keep alive

        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch  # one ubatch per decode: captured rows == batch rows, in order
        p.n_seq_max = n_seq
        p.kv_unified = unified
        p.n_threads = engine.threads
        p.n_threads_batch = engine.threads
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.cb_eval = self._cb
        p.cb_eval_user_data = None
        self._ctx = internals.LlamaContext(model=engine.llm._model, params=p, verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- callback -----------------------------------------------------------------------

    def _callback(self, t, ask, _ud) -> bool:
        try:
            name = self._ggml.ggml_get_name(t)
            if ask:
                return name in self._targets
            layer = self._targets.get(name)
            if layer is None:
                return True
            edit = None if self._edit is None else (lambda a: self._edit(layer, a))
            arr = tensor_rows(self._ggml, t, self.n_embd, edit)
            self._captured.setdefault(layer, []).append(arr)
            return name != self._stop_at
        except BaseException as e:  # an exception here would silently stop the graph
            self._error = e
            return False

    # --- decoding -----------------------------------------------------------------------

    def clear(self, seq: int = -1) -> None:
        """Forget sequence `seq`'s cells (-1: all)."""
        if seq < 0:
            self._lc.llama_memory_clear(self._mem, True)
        else:
            self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def copy(self, src: int, dst: int, n: int) -> None:
        """Make sequence `dst` hold the first `n` positions of `src` (a shared prompt).

        With a KV stream per sequence llama.cpp copies only whole streams (the buffers, at
        the next decode: a memory copy, no compute), so the copy is cut back to `n` after;
        in one unified cache the cells are shared, not copied."""
        if src == dst:
            self._lc.llama_memory_seq_rm(self._mem, dst, n, -1)
            return
        self._lc.llama_memory_seq_rm(self._mem, dst, -1, -1)
        if self.unified:
            self._lc.llama_memory_seq_cp(self._mem, src, dst, 0, n)
        else:
            self._lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            self._lc.llama_memory_seq_rm(self._mem, dst, n, -1)

    def decode(
        self,
        tokens: Sequence[int],
        pos: Sequence[int],
        seq: Sequence[int],
        logits: Sequence[bool],
        layers: Sequence[int] = (),
        edit: EditFn | None = None,
        stop_after: bool = False,
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Evaluate one batch. Returns (logits of the rows asked for, {layer: acts per row}).

        stop_after: end the graph once the deepest layer is captured (~2x faster; FACTS).
        Logits and the deeper KV cells are then garbage, so call `clear()` before reuse.
        """
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise MorphError(f"batch of {n} tokens (1..{self.n_batch} allowed)")
        for L in layers:
            if not 0 <= L < self.n_layer:
                raise MorphError(f"layer {L} is outside 0..{self.n_layer - 1}")
        b = self._batch
        b.n_tokens = n
        tok = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
        ps = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
        nsid = np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))
        lg = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
        tok[:n] = tokens
        ps[:n] = pos
        nsid[:n] = 1
        want = np.asarray(logits, dtype=bool)
        lg[:n] = want
        for i, s in enumerate(seq):
            b.seq_id[i][0] = s
        self._targets = {f"l_out-{L}".encode(): L for L in layers}
        self._stop_at = f"l_out-{max(layers)}".encode() if stop_after and layers else None
        self._captured = {}
        self._edit = edit
        self._error = None
        rc = self._lc.llama_decode(self._ctx.ctx, b)
        self._edit = None
        if self._error is not None:
            raise self._error
        if rc == 2 and self._stop_at is not None:
            rc = 0  # aborted on purpose after the last captured layer
        if rc == 1:
            raise MorphError("no KV space left in the batch context (raise n_ctx or lower n_seq)")
        if rc != 0:
            raise MorphError(f"llama_decode failed (code {rc})")
        acts = {}
        for L in layers:
            parts = self._captured.get(L, [])
            a = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else None)
            if a is None or a.shape[0] != n:
                raise MorphError(f"captured {0 if a is None else a.shape[0]} rows at layer {L}, expected {n}")
            acts[L] = a
        n_out = int(want.sum())
        if n_out and self._stop_at is None:
            ptr = self._lc.llama_get_logits(self._ctx.ctx)
            out = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        else:
            out = np.zeros((0, self.n_vocab), np.float32)
        return out, acts
