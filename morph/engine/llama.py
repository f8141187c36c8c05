"""LlamaEngine: llama.cpp through llama-cpp-python, the default CPU engine.

One warm generation context. A request's prompt is compared with the tokens already in
the KV cache and only the new suffix is evaluated (prefix reuse). Steering is one
control-vector buffer set with `llama_set_adapter_cvec`; changing it invalidates the KV
cache (FACTS: stale KV after a change gives text matching neither output), so we clear it.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from morph.engine.base import Event, Request, Timings
from morph.errors import MorphError
from morph.models import ModelInfo
from morph.steering.vector import ControlVector

PROMPT_CHUNK = 128  # prompt tokens per decode call: cancellation is checked between chunks


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LlamaEngine:
    name = "llama.cpp"

    def __init__(
        self,
        info: ModelInfo,
        n_ctx: int = 4096,
        threads: int | None = None,
        flash_attn: bool = True,
        n_batch: int = 512,
    ):
        import llama_cpp

        self._lc = llama_cpp
        self.info = info
        self.threads = threads or default_threads()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(info.file.path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                flash_attn=flash_attn,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise MorphError(f"{info.file.path}: llama.cpp could not load it ({e})") from None
        self._n_embd = self.llm.n_embd()
        self._n_layer = info.n_layer
        self._vocab = self.llm._model.vocab
        self._lock = threading.Lock()  # one stream at a time on the context
        self._cancel = threading.Event()
        self._cvec_key: bytes | None = None  # fingerprint of the vector now set (None: none)
        self._cvec_buf: np.ndarray | None = None  # keep alive while llama.cpp holds it
        self._capture = None  # lazily created capture context (morph.engine.capture)
        self._chat_formatter = None
        self._piece_buf = ctypes.create_string_buffer(64)

    # --- basics -------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_layer(self) -> int:
        return self._n_layer

    @property
    def cached_tokens(self) -> list[int]:
        return self.llm.input_ids[: self.llm.n_tokens].tolist()

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

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
        """Apply `cv` (None or all-zero: none). Returns True if the KV cache was dropped."""
        if cv is not None and cv.is_zero():
            cv = None
        key = None if cv is None else cv.fingerprint()
        if key == self._cvec_key:
            return False
        ctx = self.llm._ctx.ctx
        if cv is None:
            rc = self._lc.llama_set_adapter_cvec(ctx, None, 0, self._n_embd, 1, self._n_layer - 1)
            buf = None
        else:
            cv.validate(self._n_embd, self._n_layer)
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
        self._reset_kv()
        return True

    def _reset_kv(self) -> None:
        self.llm._ctx.kv_cache_clear()
        self.llm.n_tokens = 0

    # --- evaluation -------------------------------------------------------------------

    def _prime(self, tokens: list[int], cancel: threading.Event) -> tuple[int, bool]:
        """Bring the KV cache to `tokens`, evaluating only what is not cached.

        Returns (tokens evaluated, cancelled). At least the last token is evaluated so that
        logits are fresh for sampling.
        """
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens]
        n = min(len(cached), len(tokens) - 1)
        common = 0
        if n > 0:
            a = np.asarray(cached[:n])
            b = np.asarray(tokens[:n])
            diff = np.nonzero(a != b)[0]
            common = int(diff[0]) if diff.size else n
        llm._ctx.kv_cache_seq_rm(-1, common, -1)
        llm.n_tokens = common
        todo = tokens[common:]
        for i in range(0, len(todo), PROMPT_CHUNK):
            if cancel.is_set() or self._cancel.is_set():
                return i, True
            llm.eval(todo[i : i + PROMPT_CHUNK])
        return len(todo), False

    def _last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def _piece(self, tok: int) -> bytes:
        n = self._lc.llama_token_to_piece(self._vocab, tok, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:  # buffer too small: llama.cpp says how much it needs
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self._vocab, tok, self._piece_buf, -n, 0, False)
        return self._piece_buf.raw[:n]

    def logits(self, text: str, steering: ControlVector | None = None) -> np.ndarray:
        """Next-token logits after `text` with `steering` applied (cache reused when valid)."""
        tokens = self.tokenize(text)
        with self._lock:
            self.set_steering(steering)
            self._prime(tokens, threading.Event())
            return self._last_logits()

    def continuation_logprobs(
        self, prompt: str, continuation: str, steering: ControlVector | None = None,
        logit_bias: np.ndarray | None = None,
    ) -> np.ndarray:
        """Log-probability of each token of `continuation` after `prompt`, under `steering`
        (and a dense `logit_bias` added to every position's logits, as a sampler would).

        Used to score features (does "formal" raise the formal wording?) and fluency.
        """
        ctx_tokens = self.tokenize(prompt)
        cont = self.tokenize(continuation, add_bos=False)
        tokens = ctx_tokens + cont
        if not cont or len(tokens) > self.llm.n_batch:
            raise MorphError(f"continuation scoring needs 1..{self.llm.n_batch} tokens")
        llm = self.llm
        with self._lock:
            self.set_steering(steering)
            self._reset_kv()
            llm._batch.set_batch(tokens, n_past=0, logits_all=True)
            llm._ctx.decode(llm._batch)
            n_vocab = llm.n_vocab()
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(tokens), n_vocab))
            rows = logits[len(ctx_tokens) - 1 : len(tokens) - 1].astype(np.float64)
            if logit_bias is not None:
                rows += np.asarray(logit_bias, dtype=np.float64)
            self._reset_kv()  # the batch bypassed the token bookkeeping: start clean
        m = rows.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(rows - m).sum(axis=1, keepdims=True)))[:, 0]
        return rows[np.arange(len(cont)), cont] - lse

    def prepare_tokens(self, request: Request) -> list[int]:
        if request.messages is not None:
            text = self.format_chat(request.messages)
            return self.tokenize(text, add_bos=False, special=True)
        if request.prompt is None:
            raise MorphError("request needs a prompt or messages")
        return self.tokenize(request.prompt, add_bos=request.add_bos)

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.n_ctx:
            raise MorphError(
                f"input is {n_prompt} tokens; with {max_tokens} to generate that exceeds the "
                f"context of {self.n_ctx} tokens"
            )

    def stream(self, request: Request) -> Iterator[Event]:
        t0 = time.perf_counter()
        tokens = self.prepare_tokens(request)
        if not tokens:
            raise MorphError("empty prompt")
        max_tokens = max(0, int(request.max_tokens))
        self.check_fits(len(tokens), max_tokens)
        cancel = request.cancel or threading.Event()
        self._cancel.clear()
        with self._lock:
            yield from self._generate(tokens, request, max_tokens, cancel, t0)

    def _sampler(self, request: Request):
        from llama_cpp import _internals as internals

        s = internals.LlamaSampler()
        if request.logit_bias is not None and len(request.logit_bias):
            self._add_logit_bias(s, request.logit_bias)
        freq, presence = float(request.frequency_penalty or 0.0), float(request.presence_penalty or 0.0)
        if (request.repeat_penalty and request.repeat_penalty != 1.0) or freq or presence:
            # Tiny models loop easily, steered ones more so: a mild penalty keeps them going.
            s.add_penalties(self.llm.n_vocab(), int(request.repeat_last_n), float(request.repeat_penalty or 1.0),
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
        n_vocab = self.llm.n_vocab()
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
        self.set_steering(request.steering)
        evaluated, stopped = self._prime(tokens, cancel)
        tim.evaluated_tokens = evaluated
        tim.prompt_s = time.perf_counter() - t0
        if stopped:
            tim.total_s = time.perf_counter() - t0
            yield Event(done=True, finish_reason="cancelled", timings=tim)
            return
        sampler = self._sampler(request)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = [s for s in request.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        pending = ""  # text held back while it could still be the start of a stop string
        pending_ids: list[int] = []
        finish = "length"
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
                if self._lc.llama_vocab_is_eog(self._vocab, tok):
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
                        pending = ""
                        finish = "stop"
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
                llm.eval([tok])
            tail = decoder.decode(b"", final=True)
            if finish != "stop" or not stops:
                pending += tail
            if pending and finish != "stop":
                yield Event(text=pending, token_ids=tuple(pending_ids))
        finally:
            sampler.close()
        end = time.perf_counter()
        tim.decode_s = end - t_first if t_first else 0.0
        tim.total_s = end - t0
        yield Event(done=True, finish_reason=finish, timings=tim)

    # --- activation capture -------------------------------------------------------------

    def capture(self, texts: Sequence[str], layer: int, **kw):
        """Residual-stream activations `l_out-<layer>` per text (BOS excluded); see capture.py."""
        from morph.engine.capture import Capturer

        if self._capture is None:
            self._capture = Capturer(self)
        return self._capture.capture(texts, layer, **kw)

    def capturer(self):
        from morph.engine.capture import Capturer

        if self._capture is None:
            self._capture = Capturer(self)
        return self._capture


def _find_stop(text: str, stops: list[str]) -> int | None:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best
