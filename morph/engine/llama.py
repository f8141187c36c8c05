"""LlamaEngine: llama.cpp through llama-cpp-python, the default CPU engine.

One warm generation context. A request's prompt is compared with the tokens already in
the KV cache and only the new suffix is evaluated (prefix reuse). Steering is one
control-vector buffer set with `llama_set_adapter_cvec`, which llama.cpp adds to every
position evaluated while it is set. A cell computed under one vector is stale under
another (FACTS: text matching neither output), so every cached cell is tagged with the
vector it was computed under, and a request reuses only the cached prefix whose tokens
*and* tags match what it needs.

That is what makes `Request.apply` (base.py) cheap: for "generated" the prompt is
evaluated with no vector (its cells tagged unsteered), the vector is set without touching
the cache, and the generated tokens are evaluated under it (tagged steered). A later
unsteered or "generated" request reuses the unsteered prompt cells and re-evaluates the
steered ones; a later "all" request needs steered cells from position 0 and re-evaluates
everything. Each change of the vector costs llama.cpp a scheduler re-reserve on the next
evaluation (a few ms), so "generated" pays it twice per steered request.

With `slots=2` (the editor) the one KV cache holds two prompts as two llama.cpp sequences,
and a request reuses whichever shares the longer prefix with it (a new prompt replaces the
one used less recently). `prefill` evaluates a prompt without generating, so the editor
can prepare the text before the cursor, or the window it will need next, while the
other sequence still serves suggestions. `export_state` / `import_state` carry a cached
prompt's cells across processes (editor/kvcache.py keys and stores them). Beside the two
slots, ALT_SEQS scratch sequences let `alternatives` decode several continuations of a
cached prompt together (a suggestion's alternatives), one llama_decode per step.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np

from morph.engine.base import Event, Request, Timings, apply_factors
from morph.engine.chat import EngineCommon
from morph.engine import llamacpp
from morph.engine.llamacpp import default_threads, open_llama
from morph.engine.sampling import logprob_at
from morph.errors import MorphError
from morph.models import ModelInfo
from morph.steering.vector import ControlVector

PROMPT_CHUNK = 128  # prompt tokens per decode call: cancellation is checked between chunks
# prefill() runs while the editor idles and must give way to a suggestion within the typing
# debounce (250 ms): 16 tokens are ~0.1 s on one thread of the 2-core box (~0.3 s when a
# neighbour loads it), for ~10% less throughput than 128.
PREFILL_CHUNK = 16
# Scratch sequences beside the two slots (the editor's): the alternatives to a suggestion
# are decoded in them together, each from a copy of the slot's prompt cells (in the one
# unified KV cache a copy shares the cells), and removed again.
ALT_SEQS = 8
GIVEN_CHUNK = 4  # a given continuation's tokens per step: a step (the latency of a cancel) stays short


class _Slot:
    """A KV sequence that is not the current one: its id, token ids and cell tags."""

    __slots__ = ("seq", "ids", "tags", "n")

    def __init__(self, seq: int, ids: np.ndarray, tags: np.ndarray, n: int = 0):
        self.seq, self.ids, self.tags, self.n = seq, ids, tags, n


class LlamaEngine(EngineCommon):
    name = "llama.cpp"
    max_streams = 1  # one context: concurrent stream() calls wait for each other

    def __init__(
        self,
        info: ModelInfo,
        n_ctx: int = 4096,
        threads: int | None = None,
        flash_attn: bool = True,
        n_batch: int = 512,
        extra_bufts: bool | None = None,
        adaptive_threads: bool | None = None,
        slots: int = 1,
    ):
        import llama_cpp

        self._lc = llama_cpp
        self.info = info
        self.threads = threads or default_threads()
        try:
            self.llm = open_llama(
                info.file.path,
                extra_bufts=extra_bufts,  # None: config.toml, else off on AMX CPUs (llamacpp.py)
                n_seq_max=slots + (ALT_SEQS if slots == 2 else 0),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                flash_attn=flash_attn,
            )
        except (ValueError, RuntimeError) as e:
            raise MorphError(f"{info.file.path}: llama.cpp could not load it ({e})") from None
        self._threads_now = self.threads
        # fewer threads while other work holds the CPUs (None: config.toml's adaptive_threads, on)
        self.adaptive = self.threads > 1 and llamacpp.adaptive_threads(adaptive_threads)
        self._governor = llamacpp.ThreadGovernor(self.threads) if self.adaptive else None
        self._n_embd = self.llm.n_embd()
        self._n_layer = info.n_layer
        self._vocab = self.llm._model.vocab
        self._n_vocab = self.llm.n_vocab()
        self._lock = threading.Lock()  # one stream at a time on the context
        self._cancel = threading.Event()
        self._cvec_key: bytes | None = None  # digest of the vector now set (None: none)
        self._cvec_buf: np.ndarray | None = None  # keep alive while llama.cpp holds it
        self._tags: dict[bytes | None, int] = {None: 0}  # vector digest -> small tag
        # The current sequence's cells: ids in llm.input_ids[:llm.n_tokens], tags here.
        self._kv_tag = np.zeros(self.llm.n_ctx(), np.int32)  # per cached cell: tag it was computed under
        self._seq = 0
        self._logits_key: tuple[int, int, int] | None = None  # (sequence, length, tag) the logits follow
        self._flash_attn = flash_attn
        self._mem = llama_cpp.llama_get_memory(self.llm._ctx.ctx)
        if slots not in (1, 2):
            raise MorphError("the llama.cpp engine keeps one or two prompts (slots=1|2)")
        self.slots = slots
        self.alt_seqs = ALT_SEQS if slots == 2 else 0  # sequences `alternatives` may use at once
        n = self.llm.n_ctx()
        self._other = _Slot(1, np.zeros(n, np.intc), np.zeros(n, np.int32)) if slots == 2 else None
        self._file_sample: str | None = None  # state_key's model file digest, made once
        self._capture = None  # lazily created capture context (morph.engine.capture)
        self._chat_formatter = None
        self._piece_buf = ctypes.create_string_buffer(64)

    # --- basics -------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def cached_tokens(self) -> list[int]:
        return self.llm.input_ids[: self.llm.n_tokens].tolist()

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        return self.llm.detokenize(list(ids), special=special).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, int(token)))

    def is_control(self, token: int) -> bool:
        attr = self._lc.llama_vocab_get_attr(self._vocab, int(token))
        return bool(attr & (self._lc.LLAMA_TOKEN_ATTR_CONTROL | self._lc.LLAMA_TOKEN_ATTR_UNKNOWN))

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self._chat_formatter is None:
            meta = self.llm.metadata
            template = meta.get("tokenizer.chat_template")
            if not template:
                raise MorphError(
                    f"{self.info.file.path.name} has no chat template: use --mode continue"
                )
            tok = self.llm._model
            self._chat_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=tok.token_get_text(tok.token_eos()),
                bos_token=tok.token_get_text(tok.token_bos()),
                add_generation_prompt=add_generation_prompt,
            )
        return self._chat_formatter(messages=messages).prompt

    def close(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None
        self.llm.close()

    def cancel(self) -> None:
        self._cancel.set()

    # --- steering -------------------------------------------------------------------

    def set_steering(self, cv: ControlVector | None) -> bool:
        """Make `cv` (None or all-zero: none) the vector llama.cpp adds from the next
        evaluation on. Returns True if that changed. The cache stays: cells computed under
        another vector are not reused (see the module docstring)."""
        key = _digest(cv)
        if key == self._cvec_key:
            return False
        ctx = self.llm._ctx.ctx
        if key is None:
            rc = self._lc.llama_set_adapter_cvec(ctx, None, 0, self._n_embd, 1, self._n_layer - 1)
            buf = None
        else:
            # Checked against the model where it came in (steering/profile.py, eval/plan.py).
            # Always the full buffer: rows not covered would keep their old values.
            buf = cv.to_buffer(self._n_embd, self._n_layer)
            # But apply it only over the blocks that steer: llama.cpp adds one graph node
            # per block in [il_start, il_end], zero rows included. Same logits bit for bit;
            # the saving was within noise on 2 cores (steering costs <= 1% either way).
            steered = [il for il, v in cv.directions.items() if np.any(v)]
            rc = self._lc.llama_set_adapter_cvec(
                ctx,
                buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                buf.size,
                self._n_embd,
                min(steered),
                max(steered),
            )
        if rc != 0:
            raise MorphError("llama.cpp rejected the control vector")
        self._cvec_buf = buf
        self._cvec_key = key
        return True

    def _tag(self) -> int:
        """Tag of the vector set now (0: none)."""
        return self._tags.setdefault(self._cvec_key, len(self._tags))

    def reset_cache(self) -> None:
        """Forget the KV cache, so the next request runs as in a fresh process. Prefix reuse
        is not bit-exact (the prompt's last token evaluated alone takes other kernels than
        in a batch), so greedy text can differ after ~50 tokens; `morph eval` measures what
        `morph steer` (a fresh process) prints."""
        with self._lock:
            self._reset_kv()

    def _reset_kv(self) -> None:
        self.llm._ctx.kv_cache_clear()
        self.llm.n_tokens = 0
        self._logits_key = None
        if self._other is not None:
            self._other.n = 0

    # --- sequences (slots) ----------------------------------------------------------------

    def _switch(self) -> None:
        """Make the other sequence the current one (no cells move)."""
        o, llm = self._other, self.llm
        self._other = _Slot(self._seq, llm.input_ids, self._kv_tag, llm.n_tokens)
        self._seq, llm.input_ids, self._kv_tag, llm.n_tokens = o.seq, o.ids, o.tags, o.n

    def _seq_rm(self, seq: int, p0: int) -> None:
        self._lc.llama_memory_seq_rm(self._mem, seq, p0, -1)

    @staticmethod
    def _common(ids: np.ndarray, tags: np.ndarray, n: int, tokens: Sequence[int], tag: int) -> int:
        """Length of the prefix of `tokens` cached in these cells under `tag`."""
        m = min(n, len(tokens))
        if m <= 0:
            return 0
        diff = np.nonzero((ids[:m] != np.asarray(tokens[:m])) | (tags[:m] != tag))[0]
        return int(diff[0]) if diff.size else m

    def _matches(self, tokens: Sequence[int], tag: int) -> tuple[int, int]:
        """(reusable prefix in the current sequence, in the other one)."""
        here = self._common(self.llm.input_ids, self._kv_tag, self.llm.n_tokens, tokens, tag)
        o = self._other
        there = -1 if o is None else self._common(o.ids, o.tags, o.n, tokens, tag)
        return here, there

    def _choose(self, tokens: Sequence[int], tag: int, cap: int, reserve: int) -> int:
        """Make current the sequence to extend for `tokens` and return its reusable prefix
        (at most `cap`). A sequence is extended when it keeps at least half of its cells
        (the same prompt with text added or changed near its end), the one keeping more if
        both would; otherwise an empty one, else the one used less recently (the other), is
        replaced, so a prompt that merely starts alike does not wipe a cached one. The other
        is dropped when both would not fit in the context."""
        here, there = self._matches(tokens, tag)
        here, there = min(here, cap), min(there, cap)
        o = self._other
        if o is not None:
            def keeps(common: int, n: int) -> bool:
                return common > 0 and 2 * common >= n

            n_cur = self.llm.n_tokens
            if keeps(there, o.n) and (there > here or not keeps(here, n_cur)):
                use_other = True
            elif keeps(here, n_cur):
                use_other = False
            else:
                use_other = n_cur > 0
            if use_other:
                self._switch()
                here = there
        self._make_room(len(tokens) + reserve)
        return here

    def _make_room(self, n: int) -> None:
        """Drop the other sequence if the current one needs `n` cells besides it."""
        o = self._other
        if o is not None and o.n and n + o.n > self.n_ctx:
            self._seq_rm(o.seq, 0)
            o.n = 0

    def _logits_after(self, tokens: Sequence[int], tag: int) -> bool:
        """Whether the context's logits are the next-token logits after exactly `tokens`
        (the last decode ended them under `tag`, e.g. a prefill of what was typed); then
        that sequence becomes current and a stream samples without evaluating anything."""
        key = self._logits_key
        if key is None or key[1] != len(tokens) or key[2] != tag:
            return False
        o = self._other
        if key[0] == self._seq:
            ids, tags, n = self.llm.input_ids, self._kv_tag, self.llm.n_tokens
        elif o is not None and key[0] == o.seq:
            ids, tags, n = o.ids, o.tags, o.n
        else:
            return False
        if n != len(tokens) or self._common(ids, tags, n, tokens, tag) != n:
            return False
        if key[0] != self._seq:
            self._switch()
        return True

    # --- evaluation -------------------------------------------------------------------

    def _prime(self, tokens: list[int], cancel: threading.Event | None = None, reserve: int = 0,
               whole: bool = False, chunk: int = PROMPT_CHUNK, reuse_logits: bool = False) -> tuple[int, bool]:
        """Bring a KV sequence to `tokens`, evaluating only what is not cached (reusable:
        the same token computed under the vector set now).

        Returns (tokens evaluated, cancelled). At least the last token is evaluated so that
        logits are fresh for sampling, or with `whole` (prefill) the prompt's end. A stream
        (`reuse_logits`) evaluates nothing when the last decode left exactly the logits after
        `tokens` (a prefill of what was typed). `reserve`:
        cells still needed after the prompt. Only a stream or a prefill passes `cancel`
        (and then `cancel()` counts too): scoring calls must never stop half-way on a stale
        cancel and return the previous prompt's logits.
        """
        llm = self.llm
        if reuse_logits and self._logits_after(tokens, self._tag()):
            self._make_room(len(tokens) + reserve)
            return 0, False
        common = self._choose(tokens, self._tag(), len(tokens) - (0 if whole else 1), reserve)
        self._seq_rm(self._seq, common)
        llm.n_tokens = common
        todo = tokens[common:]
        for i in range(0, len(todo), chunk):
            if cancel is not None and (cancel.is_set() or self._cancel.is_set()):
                return i, True
            self._eval(todo[i : i + chunk])
        return len(todo), False

    def _eval(self, tokens: Sequence[int], logits_all: bool = False) -> None:
        """Append `tokens` to the current sequence under the vector set now (tagged with it).
        (Llama.eval knows only sequence 0.)"""
        self._adapt_threads()
        llm = self.llm
        n, k = llm.n_tokens, len(tokens)
        b = llm._batch.batch
        b.n_tokens = k
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = n + i
            b.seq_id[i][0] = self._seq
            b.n_seq_id[i] = 1
            b.logits[i] = logits_all
        b.logits[k - 1] = True
        llm._ctx.decode(llm._batch)
        llm.input_ids[n : n + k] = tokens
        self._kv_tag[n : n + k] = self._tag()
        llm.n_tokens = n + k
        self._logits_key = (self._seq, n + k, self._tag())  # get_logits_ith(-1) is after this

    def _adapt_threads(self) -> None:
        if self._governor is not None:
            k = self._governor.threads()
            if k != self._threads_now:
                self._lc.llama_set_n_threads(self.llm._ctx.ctx, k, k)
                self._threads_now = k

    def _last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def _piece(self, tok: int) -> bytes:
        n = self._lc.llama_token_to_piece(self._vocab, tok, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:  # buffer too small: llama.cpp says how much it needs
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self._vocab, tok, self._piece_buf, -n, 0, False)
        return self._piece_buf.raw[:n]

    def logits(self, text: str, steering: ControlVector | None = None, apply: str = "all") -> np.ndarray:
        """Next-token logits after `text` under `steering` (the whole text is prompt, so
        it gets the prompt's share of the vector; cache reused when valid)."""
        tokens = self.tokenize(text)
        prompt_f, _ = apply_factors(apply)
        with self._lock:
            self.set_steering(_scaled(steering, prompt_f))
            self._prime(tokens)
            return self._last_logits()

    def continuation_logprobs(
        self, prompt: str | Sequence[int], continuation: str | Sequence[int],
        steering: ControlVector | None = None, apply: str = "all",
        logit_bias: np.ndarray | None = None,
    ) -> np.ndarray:
        """Log-probability of each token of `continuation` after `prompt`, teacher-forced:
        `prompt` is evaluated as a request's prompt, `continuation` as its generated tokens
        (so `apply` means what it means for generation). Either may be token ids (e.g. a
        chat prompt from `prepare_tokens` and the ids a stream generated). A dense
        `logit_bias` (n_vocab) is added to every position's logits, as a sampler would.

        Used to score features (does "formal" raise the formal wording?) and fluency.
        """
        ctx_tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        cont = self.tokenize(continuation, add_bos=False) if isinstance(continuation, str) else list(continuation)
        if not cont or len(cont) > self.llm.n_batch:
            raise MorphError(f"continuation scoring needs 1..{self.llm.n_batch} tokens")
        if not ctx_tokens:
            raise MorphError("continuation scoring needs a non-empty prompt")
        self.check_fits(len(ctx_tokens), len(cont))
        prompt_f, gen_f = apply_factors(apply)
        llm = self.llm
        with self._lock:
            # The prompt goes through the KV cache like a generation's (prefix reuse: many
            # continuations of one prompt cost only their own tokens), then the
            # continuation is decoded with logits at every position and dropped again, so
            # the cache holds exactly the prompt afterwards.
            self.set_steering(_scaled(steering, prompt_f))
            self._prime(ctx_tokens, reserve=len(cont))
            n0 = llm.n_tokens
            rows = [self._last_logits()[None]]
            try:
                if len(cont) > 1:
                    self.set_steering(_scaled(steering, gen_f))
                    self._eval(cont[:-1], logits_all=True)
                    rows.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(cont) - 1, self._n_vocab)))
                rows = np.concatenate(rows).astype(np.float64)
                if logit_bias is not None:
                    rows += np.asarray(logit_bias, dtype=np.float64)
            finally:
                self._seq_rm(self._seq, n0)
                llm.n_tokens = n0
        return logprob_at(rows, cont)

    def stream(self, request: Request) -> Iterator[Event]:
        t0 = time.perf_counter()
        tokens, max_tokens = self.checked_prompt(request)
        cancel = request.cancel or threading.Event()
        self._cancel.clear()
        with self._lock:
            yield from self._generate(tokens, request, max_tokens, cancel, t0)

    # --- prefill and saved states (the editor) -------------------------------------------

    def _prompt_tag(self, request: Request) -> int:
        """Tag of the vector `request`'s prompt cells are computed under (call locked)."""
        prompt_f, _ = apply_factors(request.apply)
        return self._tags.setdefault(_digest(_scaled(request.steering, prompt_f)), len(self._tags))

    def prefill(self, request: Request) -> bool:
        """Evaluate `request`'s prompt into the KV cache without generating (the prompt's
        share of its steering applies). It goes into the sequence that shares the longest
        prefix with it, else the one used less recently, so with two slots the prompt the
        last stream used stays cached beside it. Stops between chunks of PREFILL_CHUNK
        tokens once `request.cancel` (or `cancel()`) is set: what was evaluated stays, and
        a later prefill or stream goes on from there. True when the whole prompt is cached."""
        tokens, max_tokens = self.checked_prompt(request)
        prompt_f, _ = apply_factors(request.apply)
        cancel = request.cancel or threading.Event()
        self._cancel.clear()
        with self._lock:
            if max(self._matches(tokens, self._prompt_tag(request))) >= len(tokens):
                return True  # cached already (maybe as the start of a longer prompt: kept whole)
            self.set_steering(_scaled(request.steering, prompt_f))
            _, stopped = self._prime(tokens, cancel, reserve=max_tokens, whole=True, chunk=PREFILL_CHUNK)
        return not stopped

    def reusable(self, request: Request) -> tuple[int, int]:
        """(prompt tokens of `request`, how many of them a stream would take from the cache)."""
        tokens = self.prepare_tokens(request)
        with self._lock:
            here, there = self._matches(tokens, self._prompt_tag(request))
        return len(tokens), max(here, there)

    def state_key(self, request: Request) -> dict:
        """Everything besides the prompt's tokens that cached cells for `request` depend on:
        the model file, how this llama.cpp computes and lays out cells, the vector and the
        placement (and the vector the prompt actually gets). A saved state is valid for
        another request only if this is equal and its tokens are a prefix of the prompt."""
        import llama_cpp

        path = os.path.realpath(self.info.file.path)
        st = os.stat(path)
        if self._file_sample is None:
            self._file_sample = _file_sample(path, st.st_size)
        prompt_f, _ = apply_factors(request.apply)
        hexd = lambda cv: None if _digest(cv) is None else _digest(cv).hex()  # noqa: E731
        cp = self.llm.context_params
        return {
            "model": self.info.fingerprint, "file": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sample": self._file_sample,
            "llama_cpp": llama_cpp.__version__, "flash_attn": bool(self._flash_attn),
            "extra_bufts": bool(self.llm.model_params.use_extra_bufts),
            "type_k": int(cp.type_k), "type_v": int(cp.type_v),
            "vector": hexd(request.steering), "apply": request.apply or "all",
            "prompt_vector": hexd(_scaled(request.steering, prompt_f)),
        }

    def export_state(self, request: Request) -> tuple[list[int], bytes] | None:
        """The longest cached prefix of `request`'s prompt (computed under the vector its
        prompt gets): its token ids and llama.cpp's serialised cells, or None. The sequence
        holding it is cut back to that prefix."""
        tokens = self.prepare_tokens(request)
        lc, ctx = self._lc, self.llm._ctx.ctx
        with self._lock:
            here, there = self._matches(tokens, self._prompt_tag(request))
            if there > here:
                self._switch()
                here = there
            if here <= 0:
                return None
            self._seq_rm(self._seq, here)
            self.llm.n_tokens = here
            size = lc.llama_state_seq_get_size(ctx, self._seq)
            buf = (ctypes.c_uint8 * size)()
            got = lc.llama_state_seq_get_data(ctx, buf, size, self._seq)
        if got <= 0:
            return None
        return list(tokens[:here]), ctypes.string_at(buf, got)

    def import_state(self, request: Request, tokens: Sequence[int], data: bytes) -> int:
        """Load cells saved by `export_state` for a prefix `tokens` of `request`'s prompt into
        the sequence used less recently. The caller vouches that they were computed for
        `state_key(request)`; the engine checks the tokens and what llama.cpp read back.
        Returns the number of cached tokens (0: nothing loaded)."""
        prompt = self.prepare_tokens(request)
        n = len(tokens)
        if not n or n > len(prompt) or list(prompt[:n]) != list(tokens) or not data:
            return 0
        lc, ctx = self._lc, self.llm._ctx.ctx
        with self._lock:
            tag = self._prompt_tag(request)
            if self._other is not None:
                self._switch()
            seq = self._seq
            self._seq_rm(seq, 0)
            self.llm.n_tokens = 0
            o = self._other
            if o is not None and o.n and len(prompt) + max(0, int(request.max_tokens)) + o.n > self.n_ctx:
                self._seq_rm(o.seq, 0)
                o.n = 0
            if self._logits_key is not None and self._logits_key[0] == seq:
                self._logits_key = None
            src = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            got = lc.llama_state_seq_set_data(ctx, src, len(data), seq)
            ok = (got == len(data) and lc.llama_memory_seq_pos_min(self._mem, seq) == 0
                  and lc.llama_memory_seq_pos_max(self._mem, seq) == n - 1)
            if not ok:
                self._seq_rm(seq, 0)
                return 0
            self.llm.input_ids[:n] = tokens
            self._kv_tag[:n] = tag
            self.llm.n_tokens = n
        return n

    def _sampler(self, request: Request):
        from llama_cpp import _internals as internals

        s = internals.LlamaSampler()
        if request.logit_bias is not None and len(request.logit_bias):
            self._add_logit_bias(s, request.logit_bias)
        freq, presence = float(request.frequency_penalty or 0.0), float(request.presence_penalty or 0.0)
        if (request.repeat_penalty and request.repeat_penalty != 1.0) or freq or presence:
            # Tiny models loop easily, steered ones more so: a mild penalty keeps them going.
            s.add_penalties(self._n_vocab, int(request.repeat_last_n), float(request.repeat_penalty or 1.0),
                            freq, presence)
        if request.temperature <= 0:
            s.add_greedy()
        else:
            if request.top_k and request.top_k > 0:
                s.add_top_k(int(request.top_k))
            if request.top_p is not None and 0 < request.top_p < 1:
                s.add_top_p(float(request.top_p), 1)
            s.add_temp(float(request.temperature))
            seed = self._lc.LLAMA_DEFAULT_SEED if request.seed is None else int(request.seed)
            s.add_dist(seed & 0xFFFFFFFF)
        return s

    def _add_logit_bias(self, sampler, bias) -> None:
        """llama.cpp's logit-bias sampler from a {token: bias} mapping or a dense array
        (built with numpy: a dense vocabulary-wide bias is 49k entries)."""
        n_vocab = self._n_vocab
        if isinstance(bias, np.ndarray):
            dense = np.asarray(bias, dtype=np.float32).reshape(-1)
            if dense.shape[0] != n_vocab:
                raise MorphError(f"logit bias has {dense.shape[0]} entries, the vocabulary {n_vocab}")
            ids = np.flatnonzero(dense)
            vals = dense[ids]
        else:
            ids = np.fromiter((int(t) for t in bias), dtype=np.int64, count=len(bias))
            vals = np.fromiter((float(v) for v in bias.values()), dtype=np.float32, count=len(bias))
            if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
                raise MorphError(f"logit bias token ids must be in 0..{n_vocab - 1}")
        if not ids.size:
            return
        arr = np.zeros(ids.size, dtype=[("token", np.int32), ("bias", np.float32)])
        arr["token"], arr["bias"] = ids, vals
        ptr = arr.ctypes.data_as(ctypes.POINTER(self._lc.llama_logit_bias))
        smpl = self._lc.llama_sampler_init_logit_bias(n_vocab, int(ids.size), ptr)  # copies the array
        self._lc.llama_sampler_chain_add(sampler.sampler, smpl)

    def _generate(self, tokens, request: Request, max_tokens: int, cancel, t0) -> Iterator[Event]:
        tim = Timings(prompt_tokens=len(tokens))
        prompt_f, gen_f = apply_factors(request.apply)
        self.set_steering(_scaled(request.steering, prompt_f))
        evaluated, stopped = self._prime(tokens, cancel, reserve=max_tokens, reuse_logits=True)
        tim.evaluated_tokens = evaluated
        tim.prompt_s = time.perf_counter() - t0
        if stopped:
            tim.total_s = time.perf_counter() - t0
            yield Event(done=True, finish_reason="cancelled", timings=tim)
            return
        # The generated tokens' vector, set before the first sampled token is evaluated (a
        # no-op for "all"); the prompt's cells keep the tag they were computed under.
        self.set_steering(_scaled(request.steering, gen_f))
        sampler = self._sampler(request)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = [s for s in request.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        pending = ""  # text held back while it could still be the start of a stop string
        pending_ids: list[int] = []
        finish = "length"
        hit_stop = False  # a stop string ended the text (else the model, a limit or a cancel did)
        t_first = None
        llm = self.llm
        try:
            for _ in range(max_tokens):
                if cancel.is_set() or self._cancel.is_set():
                    finish = "cancelled"
                    break
                tok = sampler.sample(llm._ctx, -1)
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    tim.ttft_s = now - t0
                tim.gen_tokens += 1
                if self.is_eog(tok):
                    finish = "stop"
                    break
                piece = decoder.decode(self._piece(tok))
                pending += piece
                pending_ids.append(tok)
                if llm.n_tokens >= self.n_ctx:
                    finish = "length"
                    break
                if stops:
                    cut = _find_stop(pending, stops)
                    if cut is not None:
                        if cut:
                            yield Event(text=pending[:cut], token_ids=tuple(pending_ids))
                        pending, pending_ids = "", []
                        finish, hit_stop = "stop", True
                        break
                    safe = len(pending) - hold
                    if safe > 0:
                        yield Event(text=pending[:safe], token_ids=tuple(pending_ids))
                        pending, pending_ids = pending[safe:], []
                elif pending:
                    yield Event(text=pending, token_ids=tuple(pending_ids))
                    pending, pending_ids = "", []
                # Evaluate after yielding (bench/engine.py: the caller gets each token one
                # decode step sooner). A caller that stops at the yield leaves a cache that
                # lacks this token, which the next request's prefix match simply re-evaluates.
                self._eval([tok])
            if not hit_stop:
                # Ended by end-of-generation, a limit or a cancel: what was held back (it
                # could have begun a stop string) and the decoder's tail are still the text.
                pending += decoder.decode(b"", final=True)
                cut = _find_stop(pending, stops) if stops else None
                if cut is not None:
                    pending, finish = pending[:cut], "stop"
                if pending:
                    yield Event(text=pending, token_ids=tuple(pending_ids))
        finally:
            sampler.close()
        end = time.perf_counter()
        tim.decode_s = end - t_first if t_first else 0.0
        tim.total_s = end - t0
        yield Event(done=True, finish_reason=finish, timings=tim)

    # --- alternatives (the editor's suggestions) --------------------------------------------

    def alternatives(self, request: Request, seeds: Sequence[int], cancel: threading.Event | None = None,
                     known: Sequence[Sequence[int]] = ()) -> list[Alternative]:
        """Continuations of `request`'s prompt, one per seed, decoded together: the prompt
        is brought into a slot as `stream` does (cached cells reused, the same steering
        placement), its cells are copied into scratch sequences (shared, not copied, in the
        unified cache), and each step is one llama_decode with one token per live sequence,
        each sampled by its own sampler (the request's sampling with that seed) under the
        same stop rules as `stream`. `known`: token ids of continuations generated before
        (the suggestion `stream` gave), scored in the same batch (teacher-forced); they come
        first in the result, with finish "given". The scratch sequences are removed again
        (also on cancel or error); the slot keeps exactly the prompt, so a later `stream`
        reuses it (its last token is evaluated again: the logits here are the batch's).
        A cancel (`cancel`, `request.cancel` or `cancel()`) ends every sequence where it is
        (finish "cancelled")."""
        n = len(seeds) + len(known)
        if n > self.alt_seqs:
            raise MorphError(f"this engine decodes at most {self.alt_seqs} alternatives at once")
        if not n:
            return []
        tokens, max_tokens = self.checked_prompt(request)
        cancel = cancel or request.cancel or threading.Event()
        self._cancel.clear()
        prompt_f, gen_f = apply_factors(request.apply)
        with self._lock:
            self.set_steering(_scaled(request.steering, prompt_f))
            _, stopped = self._prime(tokens, cancel, reserve=n * max_tokens, reuse_logits=True)
            if stopped:
                return []
            # Every token decoded here is a generated one: the generation's share of the vector.
            self.set_steering(_scaled(request.steering, gen_f))
            base = self.llm.n_tokens
            seqs = range(self.slots, self.slots + n)
            runs = [_AltRun(seqs[i], None, list(k)[:max_tokens]) for i, k in enumerate(known)]
            runs += [_AltRun(seqs[len(known) + i], self._sampler(replace(request, seed=int(s))))
                     for i, s in enumerate(seeds)]
            for r in runs:
                if not max_tokens or (r.sampler is None and not r.ids):
                    r.finish = "given" if r.sampler is None else "length"
            try:
                for r in runs:
                    self._seq_rm(r.seq, 0)
                    self._lc.llama_memory_seq_cp(self._mem, self._seq, r.seq, 0, base)
                self._decode_alternatives(runs, base, max_tokens, [s for s in request.stop if s], cancel)
            finally:
                for r in runs:
                    self._seq_rm(r.seq, 0)
                    if r.sampler is not None:
                        r.sampler.close()
                self._logits_key = None  # the context's logits are the batch's now
        return [Alternative(r.text, r.ids, r.finish or "length", r.logprobs) for r in runs]

    def _decode_alternatives(self, runs: list["_AltRun"], base: int, max_tokens: int, stops: list[str],
                             cancel: threading.Event) -> None:
        ctx = self.llm._ctx
        b = self.llm._batch.batch
        rows = {id(r): -1 for r in runs}  # batch row of each run's next-token logits (-1: the prompt's)
        known_rows: list[tuple[_AltRun, int]] = []
        while True:
            live = [r for r in runs if r.finish is None]
            if not live:
                return
            if cancel.is_set() or self._cancel.is_set():
                for r in live:
                    r.end("cancelled", stops)
                return
            k = 0

            def add(tok: int, pos: int, seq: int) -> int:
                nonlocal k
                b.token[k], b.pos[k], b.seq_id[k][0], b.n_seq_id[k], b.logits[k] = tok, pos, seq, 1, True
                k += 1
                return k - 1

            for r in live:
                if r.sampler is None:  # a given continuation: GIVEN_CHUNK of its tokens per step
                    if not r.logprobs:
                        r.logprobs.append(self._logprob(-1, r.ids[0]))
                    j0 = len(r.logprobs) - 1  # the next token to evaluate
                    for j in range(j0, min(j0 + GIVEN_CHUNK, len(r.ids) - 1)):
                        known_rows.append((r, add(r.ids[j], base + j, r.seq)))
                    if j0 + GIVEN_CHUNK >= len(r.ids) - 1:
                        r.finish = "given"
                        r.text = self.detokenize(r.ids)
                    continue
                row = rows[id(r)]
                tok = r.sampler.sample(ctx, row)
                if self.is_eog(tok):
                    r.end("stop", stops)
                    continue
                r.logprobs.append(self._logprob(row, tok))
                r.ids.append(tok)
                r.text += r.decoder.decode(self._piece(tok))
                cut = _find_stop(r.text, stops) if stops else None
                if cut is not None:
                    r.text, r.finish = r.text[:cut], "stop"
                elif len(r.ids) >= max_tokens or base + len(r.ids) >= self.n_ctx:
                    r.end("length", stops)
                else:
                    rows[id(r)] = add(tok, base + len(r.ids) - 1, r.seq)
            if not k:
                return
            b.n_tokens = k
            self._adapt_threads()
            ctx.decode(self.llm._batch)
            for r, row in known_rows:
                r.logprobs.append(self._logprob(row, r.ids[len(r.logprobs)]))
            known_rows.clear()

    def _logprob(self, row: int, tok: int) -> float:
        """log p(tok) from the logits of batch row `row` of the last decode (-1: its last)."""
        x = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(row), shape=(self._n_vocab,))
        return float(logprob_at(x[None], [tok])[0])

    # --- activation capture and batched runs (contexts of their own) -------------------

    def _capturer(self):
        from morph.engine.capture import Capturer

        if self._capture is None:
            self._capture = Capturer(self)
        return self._capture

    def capture(self, texts: Sequence[str], layer: int, add_bos: bool = True, drop_first: bool = True):
        """Residual-stream activations `l_out-<layer>` per text (BOS excluded); see capture.py."""
        return self._capturer().capture(texts, layer, add_bos=add_bos, drop_first=drop_first)

    def logits_with_edit(self, text: str, layer: int, edit) -> np.ndarray:
        return self._capturer().logits_with_edit(text, layer, edit)

    def batch_runner(self, n_seq: int = 32, n_ctx: int = 8192, n_batch: int = 512, unified: bool = True):
        from morph.engine.batch import BatchRunner

        return BatchRunner(self, n_seq=n_seq, n_ctx=n_ctx, n_batch=n_batch, unified=unified)


@dataclass
class Alternative:
    """A continuation from `LlamaEngine.alternatives`: its text as `stream` would give it
    (stop strings cut), its token ids (end-of-generation excluded), why it ended, and each
    token's log-probability under the model as it ran (its steering included; before the
    sampler's penalties and temperature)."""

    text: str
    ids: list[int]
    finish: str
    logprobs: list[float]

    @property
    def mean_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


class _AltRun:
    """One sequence of `alternatives` while it decodes."""

    def __init__(self, seq: int, sampler, ids: list[int] | None = None):
        self.seq, self.sampler = seq, sampler
        self.ids = ids if ids is not None else []
        self.logprobs: list[float] = []
        self.text = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finish: str | None = None

    def end(self, finish: str, stops: list[str]) -> None:
        """Ended by end-of-generation, a limit or a cancel: the decoder's tail is still text."""
        self.text += self.decoder.decode(b"", final=True)
        cut = _find_stop(self.text, stops) if stops else None
        if cut is not None:
            self.text, finish = self.text[:cut], "stop"
        self.finish = finish


def _file_sample(path: str, size: int, n: int = 1 << 20) -> str:
    """Digest of a model file's first and last MiB (header, and tensors a fine-tune changes):
    with size and mtime, another file in the same place is told apart without hashing it all."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        h.update(fh.read(n))
        fh.seek(max(0, size - n))
        h.update(fh.read(n))
    return h.hexdigest()


def _digest(cv: ControlVector | None) -> bytes | None:
    """Identity of a vector's numbers (None for no vector or an all-zero one)."""
    if cv is None or cv.is_zero():
        return None
    return hashlib.blake2b(cv.fingerprint(), digest_size=16).digest()


def _scaled(cv: ControlVector | None, f: float) -> ControlVector | None:
    if cv is None or f == 0.0:
        return None
    return cv if f == 1.0 else cv * f


def _find_stop(text: str, stops: list[str]) -> int | None:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best
