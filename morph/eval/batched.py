"""Batched greedy generation for `morph eval`: many requests in one multi-sequence context.

The product path (`engine.stream`, one request at a time) decodes one token per call,
which on 2 CPU cores is bound by per-call overhead; a sweep of thousands of generations
needs the step to be a matrix product. This runs up to `n_seq` requests at once through
the engine's public `batch_runner` and does what `engine.stream` does for a greedy
request:

- the same prompt tokens (`engine.prepare_tokens`: tasks' framing, the chat template),
  each prompt evaluated in calls of its own in the engine's chunks of 128 tokens;
- steering as per-row edits of the steered blocks' outputs (`l_out-N`, where llama.cpp
  adds a control vector: FACTS, the same add bit for bit), each row getting its own
  sequence's vector times `apply_factors(request.apply)`: the prompt factor on prompt
  positions, the generation factor on generated ones (so "generated" leaves the prompt
  unsteered and its first token comes from unsteered logits, as in the engine);
- greedy sampling after llama.cpp's repetition penalty over the last `repeat_last_n`
  sampled tokens (its penalties sampler: logit / p if > 0 else logit * p, in float32);
- the same end: an end-of-generation token is not part of the text, `max_tokens` caps
  the sampled tokens, a stop string cuts the text where it starts.

Each sequence has a KV stream of its own (`unified=False`). With one shared (unified)
cache, another sequence's cells in the cache changed a prompt's logits by up to 0.8
(measured: llama.cpp's attention over a longer, partly masked range is not the same
sum), and greedy text parted from the engine's within a few tokens. With separate
streams, and batches of one prompt or of one token per sequence with consecutive ids
(the shapes the runner keeps in order), the logits equal the engine's bit for bit on
this build; `experiments/eval_agreement.py` measures the texts against `engine.stream`.
Greedy requests only.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from morph.engine.base import Request, apply_factors
from morph.errors import MorphError

N_SEQ = 32  # sequences decoded together (2 cores: ~32 is where the aggregate rate levels off)
N_BATCH = 512  # tokens per decode call at most
PROMPT_CHUNK = 128  # prompt tokens per call, as LlamaEngine evaluates a prompt (same kernels)


@dataclass
class _Job:
    index: int
    tokens: list[int]
    max_tokens: int
    prompt_f: float
    gen_f: float
    dirs: dict[int, np.ndarray]  # layer -> the request's (scaled) direction, float32
    penalty: float
    last_n: int
    stops: list[str]
    gen: list[int] = field(default_factory=list)
    window: deque = field(default_factory=deque)
    counts: Counter = field(default_factory=Counter)


def _job(engine, i: int, req: Request) -> _Job:
    if req.temperature > 0:
        raise MorphError("batched generation is greedy only (temperature 0)")
    tokens = engine.prepare_tokens(req)
    if not tokens:
        raise MorphError("empty prompt")
    pf, gf = apply_factors(req.apply)
    dirs = {}
    if req.steering is not None and not req.steering.is_zero():
        req.steering.validate(engine.n_embd, engine.n_layer)
        dirs = {int(L): np.asarray(v, np.float32) for L, v in req.steering.directions.items() if np.any(v)}
    pen = float(req.repeat_penalty or 1.0)
    return _Job(i, list(tokens), max(0, int(req.max_tokens)), pf, gf, dirs, pen,
                int(req.repeat_last_n), [s for s in req.stop if s])


def _penalise(logits: np.ndarray, job: _Job) -> np.ndarray:
    """llama.cpp's penalties sampler (repeat only; frequency and presence 0)."""
    if job.penalty == 1.0 or job.last_n == 0 or not job.counts:
        return logits
    ids = np.fromiter(job.counts.keys(), dtype=np.int64)
    row = logits.copy()
    v = row[ids]
    p = np.float32(job.penalty)
    row[ids] = np.where(v <= 0, v * p, v / p)
    return row


def _accept(job: _Job, tok: int) -> None:
    if job.last_n <= 0:
        return
    if len(job.window) == job.last_n:
        old = job.window.popleft()
        job.counts[old] -= 1
        if job.counts[old] == 0:
            del job.counts[old]
    job.window.append(tok)
    job.counts[tok] += 1


def _runs(ids: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive ids (a decode call may hold one token per sequence only
    for consecutive sequence ids: see the module docstring)."""
    out: list[list[int]] = []
    for s in ids:
        if out and s == out[-1][-1] + 1:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _edit_for(rows: list[tuple[int, dict[int, np.ndarray], float]]):
    """(layers, edit) adding each row's direction times its factor at every steered block."""
    by_layer: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for i, dirs, f in rows:
        if f == 0.0:
            continue
        for L, v in dirs.items():
            idx, vs = by_layer.setdefault(L, ([], []))
            idx.append(i)
            vs.append(v if f == 1.0 else v * np.float32(f))
    if not by_layer:
        return [], None
    stacked = {L: (np.asarray(idx, np.int64), np.stack(vs)) for L, (idx, vs) in by_layer.items()}

    def edit(layer, acts):
        idx, vs = stacked[layer]
        acts[idx] += vs
        return acts

    return sorted(stacked), edit


def generate(engine, requests: Sequence[Request], n_seq: int = N_SEQ,
             on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Greedy outputs of `requests`, in order: {"text", "ids", "finish"} as `engine.stream`
    gives them. `on_done(i, output)` is called as each one finishes (to cache it)."""
    jobs = [_job(engine, i, r) for i, r in enumerate(requests)]
    out: list[dict | None] = [None] * len(jobs)
    if not jobs:
        return []
    longest = max(len(j.tokens) + j.max_tokens for j in jobs)
    n_seq = max(1, min(n_seq, len(jobs)))
    per_seq = -(-(longest + 8) // 256) * 256  # llama.cpp gives each stream n_ctx / n_seq, padded to 256
    queue = deque(range(len(jobs)))
    slots: list[_Job | None] = [None] * n_seq
    nxt = [0] * n_seq  # per slot: the sampled token still to be evaluated

    def done(job: _Job, reason: str, text: str | None = None) -> None:
        text = engine.detokenize(job.gen) if text is None else text
        out[job.index] = {"text": text, "ids": list(job.gen), "finish": reason}
        if on_done is not None:
            on_done(job.index, out[job.index])

    def take(s: int, logits_row: np.ndarray) -> None:
        """Slot s's next token from its logits row (as the engine's sampler chain picks
        it); end the job or keep the token to evaluate in the next step."""
        job = slots[s]
        tok = int(np.argmax(_penalise(logits_row, job)))
        _accept(job, tok)
        if engine.is_eog(tok):
            slots[s] = None
            done(job, "stop")
            return
        job.gen.append(tok)
        if job.stops:
            text = engine.detokenize(job.gen)
            cuts = [i for i in (text.find(st) for st in job.stops) if i >= 0]
            if cuts:
                slots[s] = None
                done(job, "stop", text[: min(cuts)])
                return
        if len(job.gen) >= job.max_tokens:
            slots[s] = None
            done(job, "length")
            return
        nxt[s] = tok

    with engine.batch_runner(n_seq=n_seq, n_ctx=n_seq * per_seq, n_batch=N_BATCH, unified=False) as runner:
        runner.clear()
        while queue or any(j is not None for j in slots):
            # Free slots take the next requests: each prompt in calls of its own, in the
            # engine's chunks, so its logits are the engine's bit for bit.
            for s in range(n_seq):
                while slots[s] is None and queue:
                    job = jobs[queue.popleft()]
                    if job.max_tokens == 0:
                        done(job, "length")
                        continue
                    runner.clear(s)
                    slots[s] = job
                    n = len(job.tokens)
                    for a in range(0, n, PROMPT_CHUNK):
                        b = min(n, a + PROMPT_CHUNK)
                        layers, edit = _edit_for([(i, job.dirs, job.prompt_f) for i in range(b - a)])
                        logits, _ = runner.decode(job.tokens[a:b], list(range(a, b)), [s] * (b - a),
                                                  [False] * (b - a - 1) + [True], layers=layers, edit=edit)
                    take(s, np.array(logits[0], dtype=np.float32))
            # One step: the last sampled token of every running sequence.
            live = [s for s in range(n_seq) if slots[s] is not None]
            for run in _runs(live):
                layers, edit = _edit_for([(i, slots[s].dirs, slots[s].gen_f) for i, s in enumerate(run)])
                pos = [len(slots[s].tokens) + len(slots[s].gen) - 1 for s in run]
                logits, _ = runner.decode([nxt[s] for s in run], pos, run, [True] * len(run),
                                          layers=layers, edit=edit)
                logits = np.array(logits, dtype=np.float32)  # valid only until the next call
                for s, row in zip(run, logits):
                    take(s, row)
    return out  # type: ignore[return-value]
