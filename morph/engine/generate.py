"""Batched generation: many jobs decoded together through one BatchRunner (engine/batch.py).

One sequence decodes at ~130 tok/s on 2 cores, bound by per-call overhead; 32 sequences
in one call approach prompt speed (FACTS). Every caller that generates many texts uses
this loop: `morph eval` (requests as `engine.stream` runs them), the SAE corpus (sampled
continuations captured as they are generated), self-explanation (a placeholder's
residual replaced), direction probes, and candidate ladders.

Greedy jobs give `engine.stream`'s tokens bit for bit (tests/test_generate.py), because:
- each prompt is evaluated in calls of its own, in the engine's chunks of 128 tokens, then
  every running sequence advances one token per call, in runs of consecutive sequence ids
  (with a KV stream per sequence, the shapes llama.cpp keeps in batch order);
- steering is a per-row edit of `l_out-N`, which is what a control vector adds (FACTS):
  the prompt factor of `apply` on prompt rows, the generation factor on generated ones;
- tokens are chosen after llama.cpp's repeat penalty (engine/sampling.py).
Jobs with the same prompt tokens and prompt steering share one prefill: the next one gets
a copy of the KV cells and the first token's logits (a memory copy instead of a prompt
evaluation; see BatchRunner.copy). With `share_prefix` (the ladder only), a prompt that only
starts like one already evaluated (the same system prompt, another instruction) copies the
common cells and evaluates the rest: cheaper, but not bit for bit `engine.stream`.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from morph.engine.base import Request, apply_factors
from morph.engine.sampling import penalize, sample_row
from morph.errors import MorphError
from morph.steering.vector import ControlVector

N_SEQ = 32  # sequences decoded together (2 cores: ~32 is where the aggregate rate levels off)
N_BATCH = 512  # tokens per decode call at most
PROMPT_CHUNK = 128  # prompt tokens per call, as LlamaEngine evaluates a prompt (same kernels)
MIN_SHARED_PREFIX = 16  # a shorter common start is evaluated again rather than copied


@dataclass
class Job:
    """One generation: a prompt and how to continue it."""

    tokens: list[int]
    steering: ControlVector | None = None  # already scaled
    apply: str = "all"  # where `steering` applies (engine/base.apply_factors)
    max_tokens: int = 256
    stop: Sequence[str] = ()  # the text ends where the first of these starts
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | Sequence[int] | None = None  # numpy seed of this job's sampler
    # Blocks whose output rows go to `on_rows` (an empty tuple: positions only; None: no call).
    capture: Sequence[int] | None = None
    capture_prompt: bool = True  # False: only generated rows go to `on_rows` (the prefill can be shared)
    # (block, prompt positions, row): those rows of the prompt are replaced by `row` at that
    # block (self-explanation), before the steering is added.
    replace: tuple[int, Sequence[int], np.ndarray] | None = None
    until: Callable[[list[int]], bool] | None = None  # ends the job (finish "until") when true for the ids so far
    keep_first_logits: bool = False  # Output.first_logits: the logits the first token came from
    ends_at: Callable[[str], int] | None = None  # like stop, computed: where the text so far ends (-1: not yet)

    @classmethod
    def from_request(cls, engine, req: Request) -> "Job":
        """A job that generates what `engine.stream(req)` does (greedy requests exactly)."""
        if (req.logit_bias is not None and len(req.logit_bias)) or req.frequency_penalty or req.presence_penalty:
            raise MorphError("batched generation has no logit bias, frequency or presence penalty")
        return cls(list(engine.prepare_tokens(req)), req.steering, req.apply, max(0, int(req.max_tokens)),
                   [s for s in req.stop if s], float(req.temperature), float(req.top_p or 1.0),
                   int(req.top_k or 0), float(req.repeat_penalty or 1.0), int(req.repeat_last_n), req.seed)


@dataclass
class Output:
    ids: list[int]  # sampled tokens, end-of-generation excluded; after a stop string, those of the kept text
    text: str
    finish: str  # "stop" (end of generation or a stop string) | "length" | "until" | "cancelled"
    first_logits: np.ndarray | None = None


@dataclass
class _Run:
    """A job in a slot: its tokens so far and its sampler state."""

    index: int
    job: Job
    prompt_f: float
    gen_f: float
    dirs: dict[int, np.ndarray]
    rng: np.random.Generator | None
    ids: list[int] = field(default_factory=list)
    window: deque = field(default_factory=deque)
    counts: Counter = field(default_factory=Counter)
    first_logits: np.ndarray | None = None

    @property
    def next_pos(self) -> int:
        """Position of the last sampled token, the one the next step evaluates."""
        return len(self.job.tokens) + len(self.ids) - 1

    def prefill_key(self) -> tuple | None:
        """What a prompt's KV cells depend on; None: never shared (captured or edited rows)."""
        if (self.job.capture is not None and self.job.capture_prompt) or self.job.replace is not None:
            return None
        if not self.dirs or not self.prompt_f:
            return (tuple(self.job.tokens), 0.0, b"")  # an unsteered prompt
        vec = b"".join(L.to_bytes(4, "little") + v.tobytes() for L, v in sorted(self.dirs.items()))
        return (tuple(self.job.tokens), self.prompt_f, vec)


def _start(index: int, job: Job) -> _Run:
    pf, gf = apply_factors(job.apply)
    dirs = {}
    if job.steering is not None and not job.steering.is_zero():
        dirs = {int(L): np.asarray(v, np.float32) for L, v in job.steering.directions.items() if np.any(v)}
    rng = np.random.default_rng(job.seed) if job.temperature > 0 else None
    return _Run(index, job, pf, gf, dirs, rng)


def _runs(ids: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive ids (one token per sequence per call keeps batch order
    only for consecutive sequence ids: engine/batch.py)."""
    out: list[list[int]] = []
    for s in ids:
        if out and s == out[-1][-1] + 1:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _edit_for(rows: list[tuple[_Run, float, Sequence[int] | None]]):
    """(layers, edit) for a decode call whose row i belongs to rows[i]: (run, factor of its
    vector, prompt positions of the row or None for a generated row)."""
    adds: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    puts: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for i, (run, f, pos) in enumerate(rows):
        rep = run.job.replace
        if rep is not None and pos is not None and pos in rep[1]:
            idx, vs = puts.setdefault(int(rep[0]), ([], []))
            idx.append(i)
            vs.append(np.asarray(rep[2], np.float32))
        if f == 0.0:
            continue
        for L, v in run.dirs.items():
            idx, vs = adds.setdefault(L, ([], []))
            idx.append(i)
            vs.append(v if f == 1.0 else v * np.float32(f))
    if not adds and not puts:
        return [], None
    stack = {L: (np.asarray(i, np.int64), np.stack(v)) for L, (i, v) in adds.items()}
    put = {L: (np.asarray(i, np.int64), np.stack(v)) for L, (i, v) in puts.items()}

    def edit(layer, acts):
        if layer in put:
            idx, vs = put[layer]
            acts[idx] = vs
        if layer in stack:
            idx, vs = stack[layer]
            acts[idx] += vs
        return acts

    return sorted(set(stack) | set(put)), edit


class _Loop:
    """The state of one `generate` call: slots of the runner, each running one job."""

    def __init__(self, runner, cancel, on_token, on_rows, on_done, prompt_chunk, share_prefill, share_prefix=False):
        self.runner, self.engine = runner, runner.engine
        self.share = share_prefill
        self.share_prefix = share_prefill and share_prefix
        self.cancel = cancel or threading.Event()
        self.on_token, self.on_rows, self.on_done = on_token, on_rows, on_done
        self.chunk = prompt_chunk or runner.n_batch
        self.slots: list[_Run | None] = [None] * runner.n_seq
        self.held: list[tuple | None] = [None] * runner.n_seq  # prefill key of the prompt cells a slot holds
        self.first: dict[tuple, np.ndarray] = {}  # prefill key -> logits after its prompt
        self.outs: list[Output | None] = []

    def run(self, jobs: Iterable[Job]) -> list[Output]:
        it = iter(jobs)
        more = True
        self.runner.clear()
        while True:
            for s in range(len(self.slots)):  # free slots take the next job (one start per pass)
                while more and self.slots[s] is None and not self.cancel.is_set():
                    job = next(it, None)
                    if job is None:
                        more = False
                    elif self._begin(s, _start(len(self.outs), job)):
                        break
            live = [s for s, r in enumerate(self.slots) if r is not None]
            if not live and more and not self.cancel.is_set():
                continue  # every job started in this pass ended at its first token
            if not live:
                return self.outs  # type: ignore[return-value]
            if self.cancel.is_set():
                for s in live:
                    self._finish(s, "cancelled")
                return self.outs  # type: ignore[return-value]
            for run in _runs(live):
                self._step(run)

    def _begin(self, s: int, run: _Run) -> bool:
        """Start `run` in slot s: its prompt evaluated (or copied), its first token taken.
        False when it needs no slot (no tokens to generate)."""
        self.outs.append(None)
        self.slots[s] = run
        if run.job.max_tokens <= 0:
            self._finish(s, "length")
            return False
        key = run.prefill_key() if self.share else None
        src = next((t for t in range(len(self.slots)) if key is not None and self.held[t] == key), None)
        if src is not None:
            self.runner.copy(src, s, len(run.job.tokens))
            row = self.first[key]
        else:
            src, n = self._shared_prefix(key) if key is not None and self.share_prefix else (None, 0)
            if src is not None:
                self.runner.copy(src, s, n)  # e.g. the system prompt of a ladder's other prompt
            row = self._prefill(s, run, start=n)
            if key is not None:
                self.first[key] = row
        self.held[s] = key
        if run.job.keep_first_logits:
            run.first_logits = row.copy()
        self._take(s, row)
        return True

    def _shared_prefix(self, key: tuple) -> tuple[int | None, int]:
        """The slot holding the longest prompt that starts like `key`'s, under the same
        prompt steering, and how many tokens they share (at least MIN_SHARED_PREFIX, and
        one fewer than the prompt: its last token is evaluated for the logits)."""
        toks, best, n_best = key[0], None, MIN_SHARED_PREFIX - 1
        for t, held in enumerate(self.held):
            if held is None or held[1:] != key[1:]:
                continue
            other = held[0]
            n = next((i for i, (a, b) in enumerate(zip(toks, other)) if a != b), min(len(toks), len(other)))
            n = min(n, len(toks) - 1)
            if n > n_best:
                best, n_best = t, n
        return (best, n_best) if best is not None else (None, 0)

    def _prefill(self, s: int, run: _Run, start: int = 0) -> np.ndarray:
        """Evaluate the prompt from `start` (the cells before it were copied into slot s)."""
        if start == 0:
            self.runner.clear(s)
        toks, n = run.job.tokens, len(run.job.tokens)
        for a in range(start, n, self.chunk):
            b = min(n, a + self.chunk)
            logits = self._decode(toks[a:b], list(range(a, b)), [s] * (b - a), [False] * (b - a - 1) + [True],
                                  [(run, run.prompt_f, p) for p in range(a, b)])
        return np.array(logits[0], dtype=np.float32)

    def _step(self, slots: list[int]) -> None:
        runs = [self.slots[s] for s in slots]
        logits = self._decode([r.ids[-1] for r in runs], [r.next_pos for r in runs], slots, [True] * len(slots),
                              [(r, r.gen_f, None) for r in runs])
        logits = np.array(logits, dtype=np.float32)  # the runner's buffer is valid only until its next call
        for s, row in zip(slots, logits):
            self._take(s, row)

    def _decode(self, tokens, pos, seq, want, rows):
        layers, edit = _edit_for(rows)
        runs = [r for r, _, _ in rows]
        caps = sorted({L for r, _, p in rows if r.job.capture and (p is None or r.job.capture_prompt)
                       for L in r.job.capture})
        logits, acts = self.runner.decode(tokens, pos, seq, want, layers=sorted(set(layers) | set(caps)), edit=edit)
        if self.on_rows is not None:
            self._report_rows(runs, pos, acts, [p is None for _, _, p in rows])
        return logits

    def _report_rows(self, runs: list[_Run], pos, acts, generated: list[bool]) -> None:
        """on_rows(job index, positions, {block: rows}) per job with `capture`, in row order."""
        i = 0
        while i < len(runs):
            j = i
            while j < len(runs) and runs[j] is runs[i]:
                j += 1
            cap = runs[i].job.capture
            if cap is not None and (generated[i] or runs[i].job.capture_prompt):
                self.on_rows(runs[i].index, np.asarray(pos[i:j]), {L: acts[L][i:j] for L in cap})
            i = j

    def _take(self, s: int, row: np.ndarray) -> None:
        """Slot s's next token from its logits row; end its job or keep the token for the
        next step."""
        run = self.slots[s]
        job = run.job
        row = penalize(row, run.counts, job.repeat_penalty) if job.repeat_last_n > 0 else row
        tok = int(np.argmax(row)) if run.rng is None else sample_row(row, run.rng, job.temperature, job.top_k,
                                                                     job.top_p)
        self._accept(run, tok)
        if self.engine.is_eog(tok):
            self._finish(s, "stop")
            return
        run.ids.append(tok)
        if self.on_token is not None:
            self.on_token(run.index, tok)
        if job.stop or job.ends_at is not None:
            text = self.engine.detokenize(run.ids)
            cuts = [text.find(st) for st in job.stop] + ([job.ends_at(text)] if job.ends_at is not None else [])
            cut = min((i for i in cuts if i >= 0), default=-1)
            if cut >= 0:
                while run.ids and len(self.engine.detokenize(run.ids[:-1])) >= cut:
                    run.ids.pop()  # tokens wholly after the cut are not part of the text
                self._finish(s, "stop", text[:cut])
                return
        if len(run.ids) >= job.max_tokens:
            self._finish(s, "length")
        elif job.until is not None and job.until(run.ids):
            self._finish(s, "until")

    @staticmethod
    def _accept(run: _Run, tok: int) -> None:
        """The penalty window: the last `repeat_last_n` sampled tokens."""
        if run.job.repeat_last_n <= 0:
            return
        if len(run.window) == run.job.repeat_last_n:
            old = run.window.popleft()
            run.counts[old] -= 1
            if not run.counts[old]:
                del run.counts[old]
        run.window.append(tok)
        run.counts[tok] += 1

    def _finish(self, s: int, finish: str, text: str | None = None) -> None:
        run = self.slots[s]
        self.slots[s] = None
        text = self.engine.detokenize(run.ids) if text is None else text
        out = Output(list(run.ids), text, finish, run.first_logits)
        self.outs[run.index] = out
        if self.on_done is not None:
            self.on_done(run.index, out)


def generate(runner, jobs: Iterable[Job], *, cancel: threading.Event | None = None,
             on_token: Callable[[int, int], None] | None = None,
             on_rows: Callable[[int, np.ndarray, dict[int, np.ndarray]], None] | None = None,
             on_done: Callable[[int, Output], None] | None = None,
             prompt_chunk: int | None = PROMPT_CHUNK, share_prefill: bool = True,
             share_prefix: bool = False) -> list[Output]:
    """Outputs of `jobs` (any iterable, taken as slots free up), in order.

    `runner`: a BatchRunner with `unified=False` (see `runner_for`) and room for each
    job's prompt and tokens. `cancel`: checked before each job starts and between steps;
    jobs still running then end with finish "cancelled" (their ids include the last
    sampled token). `on_token(i, token)` as job i samples a token; `on_rows(i, positions,
    {block: rows})` for jobs with `capture`, as their rows are evaluated (valid during the
    call); `on_done(i, output)` as job i ends. `prompt_chunk`: prompt tokens per call
    (None: a whole prompt per call, up to the runner's n_batch). `share_prefill=False`:
    every job evaluates its own prompt (bench/batch.py measures what sharing saves).
    `share_prefix`: a prompt that only starts like one evaluated before copies the common
    cells and evaluates the rest in chunks of its own, so its tokens may differ from
    `engine.stream`'s by rounding (2 of 4 report-half rewrites of `morph eval --quick`):
    for the ladder (choose.py), never for callers that must match `engine.stream`.
    """
    return _Loop(runner, cancel, on_token, on_rows, on_done, prompt_chunk, share_prefill,
                 share_prefix).run(jobs)


def runner_for(engine, jobs: Sequence[Job], n_seq: int = N_SEQ):
    """A batch runner sized for `jobs`: up to `n_seq` KV streams, each with room for the
    longest prompt plus its tokens. Close it after use."""
    longest = max((len(j.tokens) + j.max_tokens for j in jobs), default=1)
    n_seq = max(1, min(n_seq, len(jobs)))
    per_seq = -(-(longest + 8) // 256) * 256  # llama.cpp gives each stream n_ctx / n_seq, padded to 256
    return engine.batch_runner(n_seq=n_seq, n_ctx=n_seq * per_seq, n_batch=N_BATCH, unified=False)


def generate_requests(engine, requests: Sequence[Request], n_seq: int = N_SEQ,
                      on_done: Callable[[int, Output], None] | None = None) -> list[Output]:
    """`engine.stream`'s outputs for many requests at once (greedy ones bit for bit)."""
    jobs = [Job.from_request(engine, r) for r in requests]
    if not jobs:
        return []
    with runner_for(engine, jobs, n_seq) as runner:
        return generate(runner, jobs, on_done=on_done)
